"""Build a Hugging Face model from a safetensors checkpoint the way ``from_pretrained`` does, reading only the tensors
a scope needs, straight to their device and dtype.

Steps, each after transformers 5.x's own (``modeling_utils.PreTrainedModel.from_pretrained``,
``_finalize_model_loading`` and ``core_model_loading.convert_and_load_state_dict_in_model``):

1. the skeleton is built under the class's own init context (meta device, target dtype, ties left undone);
2. checkpoint names become module names through the model's own conversion mapping
   (``conversion_mapping.get_model_conversion_mapping`` and ``core_model_loading.rename_source_key``: for
   Qwen2.5-VL ``model.layers.*`` -> ``model.language_model.layers.*`` and ``visual.*`` -> ``model.visual.*``);
3. the checkpoint is checked against the skeleton for the scope: a missing, unexpected or mis-shaped tensor is a
   ``UserError`` naming the first few (transformers would initialise missing tensors at random, drop unexpected
   ones and only log it), after the model's own ignore rules (``_adjust_missing_and_unexpected_keys``);
4. only the scope's tensors get storage on the device; their bytes come from the files (``safetensors_read``);
5. buffers that are not in checkpoints (rotary ``inv_freq``) are computed by the model's own ``initialize_weights``,
   which skips every loaded tensor, and ``tie_weights`` ties ``lm_head`` to the embeddings as ``from_pretrained``
   does (symmetrically, refusing to tie two different stored matrices).

A checkpoint this path cannot read the same way (no ``model.safetensors`` or safetensors index, a
``quantization_config``, a conversion that fuses or splits tensors) raises :class:`NotFastLoadable` and the caller
uses ``from_pretrained``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.errors import UserError
from auto_quantize_model.models.fingerprint import FingerprintPlan
from auto_quantize_model.models.safetensors_read import (
    DTYPES,
    Destination,
    ReadStats,
    map_tensors,
    read_into,
)
from auto_quantize_model.safetensors_header import CheckedHeader, HeaderEntry, check_header, checkpoint_files
from auto_quantize_model.timing import StepTimes

log = logging.getLogger(__name__)

SHOWN = 3  # tensor names quoted in a refusal


class NotFastLoadable(Exception):
    """The checkpoint needs ``from_pretrained`` (the reason is the message)."""


@dataclass
class ReadModel:
    """A model read by :func:`read_model`: the whole Hugging Face model (tensors outside the scope left on the meta
    device), the scope's modules, and what the read did."""

    full: nn.Module
    scope_modules: list[nn.Module]
    stats: ReadStats  # what was read into the device (nothing on the host: mapped) and hashed
    fingerprint: str
    tensor_bytes: int  # the scope's tensor bytes in the files (read to the GPU, or mapped on the host)
    mapped: bool  # host tensors mapped from the files (pages read on first use)
    steps: dict[str, float]  # seconds per step: headers, skeleton, check, read (or read_and_hash), init


def safetensors_files(model_dir: Path) -> list[Path]:
    """The files ``from_pretrained`` reads (``safetensors_header.checkpoint_files``); NotFastLoadable without them."""
    files = checkpoint_files(model_dir)
    if files is None:
        raise NotFastLoadable("no model.safetensors or model.safetensors.index.json")
    return files


def _skeleton(cls: Any, model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device, as ``from_pretrained`` builds it before loading (config read the same way)."""
    import copy

    from transformers.utils.generic import ContextManagers

    config = cls.config_class.from_pretrained(str(model_dir))
    if getattr(config, "quantization_config", None) is not None:
        raise NotFastLoadable("a quantized checkpoint (quantization_config)")
    config.dtype = dtype
    for key in config.sub_configs:
        if (sub := getattr(config, key)) is not None:
            sub.dtype = dtype
    config.name_or_path = str(model_dir)
    with ContextManagers(cls.get_init_context(dtype, False, False, None)):
        return cls(copy.deepcopy(config))


def _rename(full: nn.Module, keys: list[str], meta: dict[str, torch.Tensor]) -> dict[str, str | None]:
    """Checkpoint key -> model state-dict name (None: the model has no such tensor)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(full)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = full.base_model_prefix
    out: dict[str, str | None] = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if pattern is not None:
            raise NotFastLoadable(f"{key} is converted (fused or split) on load")
        if name not in meta and key in meta:  # the same fallback as convert_and_load_state_dict_in_model
            name, _ = rename_source_key(key, [], [], prefix, meta)
        out[key] = name if name in meta else None
    full._weight_conversions = [m for m in mapping if m.was_used()]  # what save_pretrained reverses, as after a load
    return out


def _scope_names(full: nn.Module, scope_modules: list[nn.Module], meta: dict[str, torch.Tensor]) -> set[str]:
    """State-dict names of the tensors under ``scope_modules`` (all of them when the scope is the whole model)."""
    if scope_modules == [full]:
        return set(meta)
    prefixes = [name for name, m in full.named_modules() if any(m is s for s in scope_modules)]
    return {k for k in meta if any(k.startswith(p + ".") for p in prefixes)}


def _refusal(model_dir: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> UserError:
    parts = []
    for what, names in (("missing", missing), ("not in the model", unexpected), ("of the wrong shape", mismatched)):
        if names:
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            parts.append(f"{len(names)} tensor(s) {what} ({', '.join(sorted(names)[:SHOWN])}{more})")
    return UserError(f"the weights of {model_dir} do not match its config.json: {'; '.join(parts)}; re-save the "
                     "checkpoint with the config it was trained with (save_pretrained) or fix config.json")


@dataclass
class _KeyReport:
    """The two fields of transformers' ``LoadStateDictInfo`` that ``_adjust_missing_and_unexpected_keys`` reads and
    rewrites (its other fields differ between 5.14 and 5.17)."""

    missing_keys: set[str]
    unexpected_keys: set[str]


def _check(full: nn.Module, model_dir: Path, headers: list[CheckedHeader], names: dict[str, str | None],
           meta: dict[str, torch.Tensor], scope: set[str]) -> tuple[dict[str, tuple[CheckedHeader, str]], set[str]]:
    """What to load (model name -> file and checkpoint key) and which model names the checkpoint lacks; refuses a
    checkpoint with missing, unexpected or mis-shaped tensors in the scope."""
    found: dict[str, tuple[CheckedHeader, str]] = {}
    unexpected: set[str] = set()
    mismatched: list[str] = []
    for header in headers:
        for key, entry in header.entries.items():
            name = names[key]
            if name is None or name in found:  # unknown, or a second tensor for the same name
                unexpected.add(key)
                continue
            found[name] = (header, key)
            if name in scope and entry.shape != tuple(meta[name].shape):
                mismatched.append(f"{key} {list(entry.shape)} vs {list(meta[name].shape)}")
            elif name in scope and meta[name].is_floating_point() and not DTYPES[entry.dtype].is_floating_point:
                mismatched.append(f"{key} stored as {DTYPES[entry.dtype]}")
    absent = set(meta) - set(found)
    tied = dict(getattr(full, "all_tied_weights_keys", {}) or {})
    covered = {a for a, b in tied.items() for x, y in ((a, b), (b, a)) if x in absent and y in found}
    info = _KeyReport((absent - covered) & scope, unexpected)
    full._adjust_missing_and_unexpected_keys(info)  # the model's own ignore rules (old rotary buffers, ...)
    if info.missing_keys or info.unexpected_keys or mismatched:
        raise _refusal(model_dir, sorted(info.missing_keys), sorted(info.unexpected_keys), mismatched)
    return {k: v for k, v in found.items() if k in scope}, absent


def _materialize(full: nn.Module, load: dict[str, tuple[CheckedHeader, str]], meta: dict[str, torch.Tensor],
                 scope_modules: list[nn.Module], device: torch.device) -> dict[Path, list[Destination]]:
    """Put each tensor to load in place: on the host, memory-mapped from its file (cast where the dtype differs, as
    ``from_pretrained`` does); on a GPU, empty storage to read into. The scope's non-persistent buffers get empty
    storage too. Returns the reads left to do, by file."""
    mapped: dict[str, torch.Tensor] = {}
    if device.type == "cpu":
        wanted: dict[Path, tuple[CheckedHeader, list[HeaderEntry]]] = {}
        for header, key in load.values():
            wanted.setdefault(header.path, (header, []))[1].append(header.entries[key])
        for header, entries in wanted.values():
            mapped.update({f"{header.path}:{k}": v for k, v in map_tensors(header, entries).items()})
    reads: dict[Path, list[Destination]] = {}
    for name, (header, key) in load.items():
        module_name, _, attr = name.rpartition(".")
        module = full.get_submodule(module_name)
        if mapped:
            src = mapped[f"{header.path}:{key}"]
            tensor = src if src.dtype == meta[name].dtype else src.to(meta[name].dtype)
        else:
            tensor = torch.empty(meta[name].shape, dtype=meta[name].dtype, device=device)
            reads.setdefault(header.path, []).append((header.entries[key], tensor))
        placed = nn.Parameter(tensor, requires_grad=False) if attr in module._parameters else tensor
        placed._is_hf_initialized = True  # type: ignore[attr-defined]  # initialize_weights must leave it alone
        (module._parameters if attr in module._parameters else module._buffers)[attr] = placed
    for scope_module in scope_modules:
        for module in scope_module.modules():
            for attr in module._non_persistent_buffers_set:
                buf = module._buffers.get(attr)
                if buf is not None and buf.device.type == "meta":
                    module._buffers[attr] = torch.empty_like(buf, device=device)
    return reads


def _on_meta(modules: list[nn.Module]) -> str | None:
    """The first parameter, buffer or tensor attribute under ``modules`` still on the meta device."""
    for top in modules:
        for name, module in top.named_modules():
            tensors = itertools.chain(module._parameters.items(), module._buffers.items(),
                                      ((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor)))
            for attr, t in tensors:
                if t is not None and t.device.type == "meta":
                    return f"{name}.{attr}" if name else attr
    return None


def read_model(cls: Any, model_dir: Path, scope_of: Callable[[nn.Module], list[nn.Module]], dtype: torch.dtype,
               device: torch.device, fingerprint: FingerprintPlan) -> ReadModel:
    """Build ``cls`` from ``model_dir`` with the tensors of the modules ``scope_of(full)`` returns read onto
    ``device`` in ``dtype``; the fingerprint's unhashed files are hashed during the read."""
    steps = StepTimes()
    done = steps.done
    files = safetensors_files(model_dir)
    headers = [check_header(f) for f in files]
    done("headers")
    full = _skeleton(cls, model_dir, dtype)
    done("skeleton")
    scope_modules: list[nn.Module] = scope_of(full)
    meta = full.state_dict()
    names = _rename(full, [k for h in headers for k in h.entries], meta)
    load, absent = _check(full, model_dir, headers, names, meta, _scope_names(full, scope_modules, meta))
    reads = _materialize(full, load, meta, scope_modules, device)
    done("check")
    todo = fingerprint.todo
    stats = read_into(list(reads.items()), device, todo)
    done("read_and_hash" if todo else "read")
    digest = fingerprint.finish(stats.digests if todo else {})
    with torch.no_grad():
        for name in getattr(full, "all_tied_weights_keys", {}) or {}:
            if name in absent:
                full.get_parameter(name)._is_hf_initialized = True  # it is tied below: no init for nothing
        full.initialize_weights()  # non-persistent buffers; loaded tensors are flagged and skipped
        full.tie_weights(missing_keys=absent, recompute_mapping=False)
    left = _on_meta(scope_modules)
    if left:  # a tensor the model makes outside its state dict and initialize_weights: from_pretrained knows better
        raise NotFastLoadable(f"{left} has no value after the read")
    full.eval()
    full.set_use_kernels(False, None)
    if full.can_generate():
        full.adjust_generation_fn(None, False, None, str(model_dir), cache_dir=None, force_download=False,
                                  proxies=None, local_files_only=True, token=None, revision="main", subfolder="",
                                  trust_remote_code=False)
    done("init")
    tensor_bytes = sum(h.entries[k].end - h.entries[k].start for h, k in load.values())
    return ReadModel(full, scope_modules, stats, digest, tensor_bytes, mapped=device.type == "cpu", steps=steps.seconds)
