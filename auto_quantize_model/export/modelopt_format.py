"""The ModelOpt unified HF format (``--format modelopt``, the default): ModelOpt's exporter writes the layout and
configs, then every FP8 tensor is replaced by the evaluated codes and scales (see ``export/hf.py``), and with
``--kv-cache fp8`` the K/V scales and ``kv_cache_quant_algo`` are added.

KV cache: ModelOpt stores a layer's scales as ``<attn>.k_proj.k_scale`` and ``<attn>.v_proj.v_scale`` (float32),
declares ``kv_cache_quant_algo: FP8`` in ``hf_quant_config.json`` and ``kv_cache_scheme`` {dynamic false, num_bits 8,
type float} in config.json's ``quantization_config`` (``modelopt/torch/export/quant_utils.py``
``_KV_CACHE_REPLACEMENTS``, ``convert_hf_config.py``; 0.47.0). vLLM 0.34.0 remaps those names onto its attention
layers; SGLang 0.5.23's Qwen2.5-VL loader has no such remap and refuses them (tests/engine_rules).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.export.checks import read_tensor_meta
from auto_quantize_model.export.configs import finish_configs
from auto_quantize_model.export.kv_cache import KvCacheScales

KV_CACHE_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}
SGLANG_KV_WARNING = ("SGLang 0.5.23 cannot load ModelOpt's KV-cache scale names for Qwen2.5-VL (k_proj.k_scale: "
                     "KeyError); serve this export with vLLM, or use --format compressed-tensors")


def kv_tensor_names(attention_prefixes: list[str]) -> list[tuple[str, str]]:
    """(k name, v name) per layer, from each layer's attention checkpoint prefix."""
    return [(f"{p}.k_proj.k_scale", f"{p}.v_proj.v_scale") for p in attention_prefixes]


def rewrite_tensors(export_dir: Path, replace: dict[str, torch.Tensor], add: dict[str, tuple[str, torch.Tensor]]) \
        -> None:
    """Replace ``replace`` in the safetensors files that hold them (names, dtypes, shapes and metadata kept) and
    add each ``add`` tensor (name -> (a stored tensor whose file takes it, tensor))."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    meta = read_tensor_meta(export_dir)
    absent = sorted(set(replace) - set(meta)) + sorted(home for home, _ in add.values() if home not in meta)
    if absent:
        raise RuntimeError(f"ModelOpt's exporter wrote no {absent[0]} ({len(absent)} tensors missing)")
    files = {meta[k].file for k in replace} | {meta[home].file for home, _ in add.values()}
    for f in sorted(files):
        with safe_open(str(f), "pt") as fh:
            metadata = fh.metadata()
        data = load_file(str(f))
        for k in (k for k in replace if meta[k].file == f):
            new = replace[k]
            if new.dtype != data[k].dtype or new.numel() != data[k].numel():
                raise RuntimeError(f"{k}: computed {new.dtype} {tuple(new.shape)}, ModelOpt wrote {data[k].dtype} "
                                   f"{tuple(data[k].shape)}")
            data[k] = new.reshape(data[k].shape).contiguous()
        data.update({k: t.contiguous() for k, (home, t) in add.items() if meta[home].file == f})
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(data, str(tmp), metadata=metadata)
        os.replace(tmp, f)


def _declare_kv_cache(export_dir: Path) -> None:
    hf_path, cfg_path = export_dir / "hf_quant_config.json", export_dir / "config.json"
    hf = json.loads(hf_path.read_text(encoding="utf-8"))
    hf["quantization"]["kv_cache_quant_algo"] = "FP8"
    hf_path.write_text(json.dumps(hf, indent=4), encoding="utf-8")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.setdefault("quantization_config", {})["kv_cache_scheme"] = dict(KV_CACHE_SCHEME)
    cfg_path.write_text(json.dumps(cfg, indent=4), encoding="utf-8")


def write_modelopt(model: nn.Module, tensors: dict[str, torch.Tensor], kv: KvCacheScales | None,
                   attention_prefixes: list[str], out: Path) -> dict[str, Any]:
    """ModelOpt's export of ``model`` (quantizers restored) into ``out`` with ``tensors`` (checkpoint name ->
    evaluated FP8 tensor) written over its own, plus the KV-cache scales; returns the config fixes made."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    add: dict[str, tuple[str, torch.Tensor]] = {}
    if kv is not None:
        for i, (k_name, v_name) in enumerate(kv_tensor_names(attention_prefixes)):
            home = f"{attention_prefixes[i]}.k_proj.weight"
            add[k_name] = (home, kv.tensor("k", i))
            add[v_name] = (home, kv.tensor("v", i))
    rewrite_tensors(out, tensors, add)
    fixes = finish_configs(out, read_tensor_meta(out))
    if kv is not None:
        _declare_kv_cache(out)
    return fixes


def check_kv_declared(export_dir: Path, kv_tensors: bool) -> None:
    """The final check's format part: ``kv_cache_quant_algo`` is FP8 exactly when KV-cache scales are stored."""
    from auto_quantize_model.errors import UserError

    hf = json.loads((export_dir / "hf_quant_config.json").read_text(encoding="utf-8"))
    declared = (hf.get("quantization") or {}).get("kv_cache_quant_algo") == "FP8"
    if declared != kv_tensors:
        raise UserError(f"{export_dir}: kv_cache_quant_algo and the stored KV-cache scales disagree; re-export")
