"""Which modules a ModelOpt conversion wraps must depend on the model, never on what the process did before.

ModelOpt registers Hugging Face attention classes for KV-cache quantization *on the fly*, the first time it converts a
``transformers.PreTrainedModel`` (``register_hf_attentions_on_the_fly`` in
``modelopt/torch/quantization/plugins/huggingface.py``, which returns early for any other module). The registration
is global and permanent for the process. Our language-model searches run on ``LanguageModelWithHead``, a plain
``nn.Module``: in a fresh process its attention stays a plain module, but after any whole-VLM search, whole-VLM
restore or other conversion of the full Hugging Face model in the same process, the same search wraps every
attention with four (disabled) ``*_bmm_quantizer``s. Numerically nothing changes (no format here enables them), but
the restore artifact's quantizer keys then depend on the process's history, and restoring it in a process with the
other history fails (``ApplyModeError: Extra keys in quantizer state_dict``; seen when `autoquant ship` exported a
sweep trial in a process that had exported a whole-VLM run before).

The rule here: a conversion sees the registrations a fresh process would have, that is none for a model that is not
a ``PreTrainedModel``; a restore sees exactly the attention registrations its artifact's quantizer keys need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

BMM_SUFFIX = "_bmm_quantizer"


def _attention_dm_classes() -> tuple[type, ...]:
    from modelopt.torch.quantization.plugins import huggingface as hf

    return tuple(c for c in (getattr(hf, "_QuantAttention", None), getattr(hf, "_T5QuantAttention", None)) if c)


def _registered_attentions() -> dict[type, type]:
    """Original attention class -> its quantized class, for every attention registration in this process."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    kinds = _attention_dm_classes()
    # The registry's own table (``_DMRegistryCls._registry``); ModelOpt has no public listing.
    registry = QuantModuleRegistry._registry.items()
    return {cls: dm for cls, dm in registry if isinstance(dm, type) and issubclass(dm, kinds)}


@contextlib.contextmanager
def _attention_registrations(wanted: dict[type, type]) -> Iterator[None]:
    """For the duration, the process's attention registrations are exactly ``wanted``; restored after."""
    import modelopt.torch.quantization as mtq

    before = _registered_attentions()
    removed = {c: dm for c, dm in before.items() if wanted.get(c) is not dm}
    added = {c: dm for c, dm in wanted.items() if before.get(c) is not dm}
    for cls in removed:
        mtq.unregister(cls)
    for cls, dm in added.items():
        mtq.register(cls, dm)
    try:
        yield
    finally:
        for cls in added:
            if cls in _registered_attentions():
                mtq.unregister(cls)
        for cls, dm in removed.items():
            if cls not in _registered_attentions():
                mtq.register(cls, dm)


def as_in_a_fresh_process(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Convert ``model`` with the attention registrations a fresh process has: none for a plain ``nn.Module`` (our
    language-model wrapper); a ``PreTrainedModel`` registers its own on the fly, as ModelOpt always does."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return contextlib.nullcontext()
    return _attention_registrations({})


def for_quantizer_keys(model: nn.Module, keys: Iterable[str]) -> contextlib.AbstractContextManager[None]:
    """Restore into ``model`` a quantizer state with ``keys``: attention quantized exactly where the keys say so."""
    keys = list(keys)
    wanted_modules = {k[: k.rindex(".")] for k in keys if k.endswith(BMM_SUFFIX) and "." in k}
    if not wanted_modules:
        return _attention_registrations({})
    kinds = _attention_dm_classes()
    base = kinds[0]
    wanted: dict[type, Any] = dict(_registered_attentions())
    for name, mod in model.named_modules():
        if name in wanted_modules and type(mod) not in wanted:
            wanted[type(mod)] = base
    return _attention_registrations(wanted)
