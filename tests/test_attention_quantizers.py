"""The modules a search wraps depend on the model, not on the process's history (autoquant/attention_quantizers.py).

On the old code, converting a full Hugging Face model once (a whole-VLM search, restore or `mtq.quantize`) registers
its attention class with ModelOpt for the rest of the process: an artifact written before could then no longer be
restored (``ApplyModeError: Extra keys in quantizer state_dict``), and language-model searches written after carried
attention quantizers a fresh process would not give them. `autoquant ship` met the first in the test suite."""

from __future__ import annotations

import copy

import pytest
import torch

from auto_quantize_model.autoquant.attention_quantizers import BMM_SUFFIX, _registered_attentions
from auto_quantize_model.autoquant.restore import apply_restore_artifact, read_restore_artifact
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import get_scheme, resolve_scheme


@pytest.fixture
def attention_registered(tiny_model_dir):
    """Converts the whole tiny VLM (a PreTrainedModel) as a whole-VLM run would; unregisters what that left."""
    import modelopt.torch.quantization as mtq

    from auto_quantize_model.models.loading import load_model
    from auto_quantize_model.models.scope import Scope

    before = set(_registered_attentions())

    def pollute() -> None:
        full = load_model(tiny_model_dir, Scope.WHOLE_VLM, device="cpu").model
        mtq.quantize(full, mtq.FP8_DEFAULT_CFG, forward_loop=None)
        assert set(_registered_attentions()) - before  # ModelOpt registered the attention class for the process

    yield pollute
    for cls in set(_registered_attentions()) - before:
        mtq.unregister(cls)


def _bmm_keys(path) -> list[str]:
    return [k for k in read_restore_artifact(path)["quantizer_state_dict"] if k.endswith(BMM_SUFFIX)]


def test_artifacts_restore_and_searches_match_whatever_the_process_converted_before(loaded, calib, tmp_path,
                                                                                   attention_registered):
    scheme = resolve_scheme(get_scheme("fp8_autoquant_top50"), num_score_steps=2, num_calib_steps=2)
    first = run_scheme(loaded, calib, scheme, tmp_path / "a", cache_dir=tmp_path / "cache")
    assert first.restore_path is not None and not _bmm_keys(first.restore_path)
    x = calib.batches[0]
    want = loaded.forward_step(first.model, x)

    attention_registered()  # a whole-VLM conversion in the same process

    # The artifact written before still restores (old code: ApplyModeError, extra keys) and gives the same model.
    rebuilt = apply_restore_artifact(copy.deepcopy(loaded.model), first.restore_path, loaded.describe(),
                                     first.manifest).eval()
    assert torch.equal(loaded.forward_step(rebuilt, x), want)
    # A search now wraps what it wraps in a fresh process (old code: four *_bmm_quantizer per attention).
    second = run_scheme(loaded, calib, scheme, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert second.restore_path is not None and not _bmm_keys(second.restore_path)
    assert not any(n.endswith(BMM_SUFFIX) for n, _ in second.model.named_modules())
