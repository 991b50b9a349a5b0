"""The compressed-tensors format (``--format compressed-tensors``): what llm-compressor writes for static per-tensor
FP8 W8A8 (``float-quantized``), through the ``compressed-tensors`` library, holding the evaluated codes and scales.

The library makes the config and the layout, as llm-compressor does: a ``QuantizationConfig`` with one
``QuantizationScheme`` (weights and input activations ``QuantizationArgs`` FP8, static, per tensor, symmetric),
``apply_quantization_config`` on the plain model (it registers ``weight_scale``/``input_scale`` on exactly the modules
the config's targets and ignore list pick, and ``k_scale``/``v_scale`` on attention for a ``kv_cache_scheme``), each
FP8 Linear compressed by ``compress_module`` (the ``float-quantized`` compressor: weight to FP8 codes, symmetric zero
points dropped), ``save_pretrained``, then ``ModelCompressor.update_config`` writes ``quantization_config``.

Exactness. The compressor computes codes as ``fp8(clamp(w / weight_scale))``; handed the evaluated weight in float32,
``fl(code * I)`` (``export/fp8_codes.py``), with ``weight_scale = I``, it gives back ``code`` itself: ``fl(fl(code *
I) / I)`` is within 2^-23 of ``code`` relatively, far inside half an FP8 step, and ``|code| <= 448``. Every code is
then compared with the evaluated one, and the final check compares the files again. Scales are stored in float32
(llm-compressor stores the model dtype, bf16, which would round the evaluated scales; vLLM loads either).

Names. The config must select the same Linears in every reader: ``transformers`` matches the names of its runtime
model (``model.language_model.layers.N...``, ``model.visual...``), vLLM 0.34.0 maps names containing a dot through
its Qwen2.5-VL rename (``model.language_model.`` -> ``language_model.model.``) and keeps ``re:`` regexes as they are,
matching by exact name or ``re.match`` only (no globs: ``visual*`` matches nothing), and a target class ``Linear`` is
found inside vLLM's class names (``QKVParallelLinear``...) but not in ``ParallelLMHead``
(``compressed_tensors/utils.py`` ``find_matched_target``; tests/engine_rules/vllm_compressed_tensors.py). So: targets
``Linear`` plus ``re:.*lm_head$`` when lm_head is FP8; ignore = the vision tower as ``re:(model\\.)?visual\\.`` when
none of it is FP8, and every other BF16 Linear by its runtime name (lm_head by ``lm_head``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.errors import UserError
from auto_quantize_model.export.checks import read_tensor_meta
from auto_quantize_model.export.configs import describe_lm_head
from auto_quantize_model.export.fp8_codes import Fp8Tensors
from auto_quantize_model.export.kv_cache import KvCacheScales

FLOAT_QUANTIZED = "float-quantized"
FP8_ARGS: dict[str, Any] = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
VISION_IGNORE = r"re:(model\.)?visual\."
LM_HEAD_TARGET = r"re:.*lm_head$"


@dataclass(frozen=True)
class Fp8Layer:
    """One FP8 Linear of the run: its module name in the runtime model, its checkpoint prefix, its stored form."""

    runtime: str
    checkpoint: str
    tensors: Fp8Tensors


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantization_config(model: nn.Module, fp8: set[str], kv_cache: bool) -> Any:
    """The ``QuantizationConfig`` that selects exactly the runtime-named Linears ``fp8`` of ``model``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    from auto_quantize_model.export.configs import vision_prefixes

    linears = _linears(model)
    vision = {n for n in linears if any(n.startswith(p + ".") for p in vision_prefixes(linears))}
    ignore = [VISION_IGNORE] if vision and not vision & fp8 else []
    ignore += sorted(n for n in linears if n not in fp8 and not (ignore and n in vision))
    # The regex first: the library stops at the first target a module matches ("Linear" would take lm_head and
    # leave the regex warned about as matching nothing).
    targets = ([LM_HEAD_TARGET] if "lm_head" in fp8 else []) + ["Linear"]
    scheme = QuantizationScheme(targets=targets, weights=QuantizationArgs(**FP8_ARGS),
                                input_activations=QuantizationArgs(**FP8_ARGS))
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format=FLOAT_QUANTIZED,
                              quantization_status="compressed",
                              kv_cache_scheme=QuantizationArgs(**FP8_ARGS) if kv_cache else None)


def selected_linears(model: nn.Module, qc: Any) -> set[str]:
    """Runtime names of the Linears the compressed-tensors library quantizes under ``qc`` (its own matcher)."""
    from compressed_tensors.utils.match import match_named_modules

    targets = [t for g in qc.config_groups.values() for t in g.targets]
    return {n for n, m in match_named_modules(model, targets, qc.ignore) if isinstance(m, nn.Linear)}


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter (dtype and shape included) with ``value``."""
    setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=False))


def _untie_head(model: nn.Module) -> None:
    """Give an FP8 lm_head its own weight and declare it untied (it cannot share the BF16 embedding)."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules the library gave KV-cache scales, in layer order."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "k_scale", None), torch.Tensor)]
    # A module without a layer index sorts last; the caller's count check then names the mismatch in one line.
    def index(m: nn.Module) -> int:
        idx = getattr(m, "layer_idx", None)
        return int(idx) if isinstance(idx, int) else 1 << 30

    return sorted(mods, key=index)


def write_compressed_tensors(model: nn.Module, layers: list[Fp8Layer], kv: KvCacheScales | None,
                             out: Path) -> dict[str, Any]:
    """Write ``model`` (the plain BF16 model on the host) with ``layers`` in FP8 into ``out``; returns the export
    record's ``lm_head``/exclusion facts."""
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    fp8 = {layer.runtime for layer in layers}
    qc = quantization_config(model, fp8, kv is not None)
    head_fp8 = "lm_head" in fp8
    if head_fp8:
        _untie_head(model)
    apply_quantization_config(model, qc, show_progress=False)
    picked = selected_linears(model, qc)
    if picked != fp8:
        raise RuntimeError(f"the compressed-tensors config selects {len(picked)} Linears, the run has {len(fp8)} FP8 "
                           f"(e.g. {sorted(picked ^ fp8)[:3]})")
    for layer in layers:
        module = model.get_submodule(layer.runtime)
        t = layer.tensors
        # The evaluated weight in float32; the compressor's division by I gives the evaluated codes back.
        _set(module, "weight", t.weight.float() * t.weight_scale.float())
        _set(module, "weight_scale", t.weight_scale.float().reshape(1))
        _set(module, "input_scale", t.input_scale.float().reshape(1))
        compress_module(module)
        if not torch.equal(module.weight.view(torch.uint8), t.weight.view(torch.uint8)):
            raise RuntimeError(f"compressed-tensors wrote other FP8 codes than the evaluated ones for {layer.runtime}")
    if kv is not None:
        attention = _attention_modules(model)
        if len(attention) != kv.num_layers:
            raise RuntimeError(f"{len(attention)} attention modules got KV-cache scales, the model has {kv.num_layers}")
        for i, attn in enumerate(attention):
            _set(attn, "k_scale", kv.tensor("k", i, (1,)))
            _set(attn, "v_scale", kv.tensor("v", i, (1,)))
    qc.quantization_status = QuantizationStatus.COMPRESSED
    model.save_pretrained(str(out))
    ModelCompressor(quantization_config=qc).update_config(str(out))
    return {"excluded_vision_prefixes": [VISION_IGNORE] if VISION_IGNORE in qc.ignore else [],
            "lm_head": describe_lm_head(read_tensor_meta(out), head_fp8)}


def check_config(export_dir: Path, model: nn.Module, fp8_runtime: set[str], kv_tensors: bool) -> None:
    """The final check's format part: config.json's compressed-tensors config parses with the library, is static
    per-tensor FP8 W8A8 in ``float-quantized`` form, selects exactly the FP8 Linears stored (runtime names), and
    declares an FP8 KV cache exactly when KV scales are stored."""
    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((export_dir / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    if raw.get("quant_method") != "compressed-tensors":
        raise UserError(f"{export_dir}/config.json does not declare quant_method compressed-tensors; re-export")
    try:
        qc = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k in QuantizationConfig.model_fields})
    except ValueError as exc:
        raise UserError(f"{export_dir}/config.json has an invalid compressed-tensors config ({exc.__class__.__name__})"
                        "; re-export") from exc
    if qc.format != FLOAT_QUANTIZED:
        raise UserError(f"{export_dir}: compressed-tensors format {qc.format!r}, not {FLOAT_QUANTIZED}; re-export")
    for name, group in qc.config_groups.items():
        for args in (group.weights, group.input_activations):
            got = None if args is None else {k: getattr(args, k) for k in FP8_ARGS}
            if got != FP8_ARGS:  # the library's enums are str enums: "float" == QuantizationType.FLOAT
                raise UserError(f"{export_dir}: config group {name} is not static per-tensor FP8 W8A8; re-export")
    picked = selected_linears(model, qc)
    if picked != fp8_runtime:
        raise UserError(f"{export_dir}: the compressed-tensors config selects {len(picked)} Linears but "
                        f"{len(fp8_runtime)} are stored in FP8 (e.g. {sorted(picked ^ fp8_runtime)[:2]}); re-export")
    if (qc.kv_cache_scheme is not None) != kv_tensors:
        raise UserError(f"{export_dir}: kv_cache_scheme and the stored KV-cache scales disagree; re-export")
