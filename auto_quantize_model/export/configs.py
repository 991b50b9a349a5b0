"""The two config fixes ModelOpt's exporter leaves to its caller: exclude an unquantized vision tower, untie an
FP8 lm_head (see ``export/hf.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from auto_quantize_model.autoquant.serving import FP8_DTYPE
from auto_quantize_model.export.checks import TensorMeta


def vision_prefixes(keys: list[str]) -> list[str]:
    """Top-level module prefixes of the vision tower in the exported names (``visual``, ``model.visual``)."""
    return sorted({k[: k.index("visual.") + len("visual")] for k in keys if "visual." in k})


def finish_configs(export_dir: Path, tensors: dict[str, TensorMeta]) -> dict[str, Any]:
    """Exclude an unquantized vision tower and untie an FP8 lm_head; returns what was done."""
    keys = list(tensors)
    extra = [f"{p}*" for p in vision_prefixes(keys)
             if not any(k.startswith(p + ".") and k.endswith("weight_scale") for k in keys)]
    hf_path, cfg_path = export_dir / "hf_quant_config.json", export_dir / "config.json"
    hf = json.loads(hf_path.read_text(encoding="utf-8"))
    hf["quantization"]["exclude_modules"] = sorted(set(hf["quantization"].get("exclude_modules") or []) | set(extra))
    hf_path.write_text(json.dumps(hf, indent=4), encoding="utf-8")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    qc = cfg.get("quantization_config", {})
    if "ignore" in qc:
        qc["ignore"] = sorted(set(qc["ignore"]) | set(extra))
    if "exclude_modules" in qc:
        qc["exclude_modules"] = sorted(set(qc["exclude_modules"]) | set(extra))
    head = tensors.get("lm_head.weight")
    head_fp8 = head is not None and head.dtype == FP8_DTYPE
    untied = False
    if head_fp8:
        for section in (cfg, cfg.get("text_config") or {}):
            if section.get("tie_word_embeddings"):
                section["tie_word_embeddings"] = False
                untied = True
    cfg_path.write_text(json.dumps(cfg, indent=4), encoding="utf-8")
    return {"excluded_vision_prefixes": extra, "lm_head": describe_lm_head(tensors, untied)}


def describe_lm_head(tensors: dict[str, TensorMeta], untied: bool) -> str:
    """How the export stores lm_head (the export record's ``lm_head``)."""
    head = tensors.get("lm_head.weight")
    if head is not None and head.dtype == FP8_DTYPE:
        return "fp8, stored as its own tensor beside the BF16 embedding" + (" (untied)" if untied else "")
    return "bf16" + ("" if head is not None else ", tied to model.embed_tokens (stored once)")
