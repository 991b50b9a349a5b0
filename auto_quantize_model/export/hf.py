"""``autoquant export``: a run's FP8/BF16 layer choice as a whole-VLM Hugging Face checkpoint.

The weights come from the original checkpoint, the quantizer scales from the run's restore artifact,
and the file format from ModelOpt's own exporter (``export_hf_checkpoint``: safetensors with FP8
weights plus ``weight_scale``/``input_scale``, ``hf_quant_config.json``, ``quantization_config`` in
config.json) -- the format vLLM, TensorRT-LLM and SGLang load for ModelOpt checkpoints.

Two things the exporter leaves to the caller, done here:
- the vision tower has no quantizers when only the language model was searched, so the exporter does
  not list it as excluded; a loader would then treat its Linears as FP8. It is added to the exclusions.
- a tied lm_head (Qwen2.5-VL-3B) that the run made FP8 can no longer share the BF16 embedding: the
  exporter keeps both tensors, and ``tie_word_embeddings`` is turned off so loaders do not re-tie them.
  A BF16 lm_head stays tied and is stored once (as the embedding).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.autoquant.manifest import NO_QUANT
from auto_quantize_model.autoquant.rebuild import RunArtifacts, check_same_checkpoint, find_run
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_directory, atomic_write_json
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.provenance import git_revision, versions

log = logging.getLogger(__name__)

# Formats whose export is per-tensor FP8 E4M3 weights and activations (what fp8_linear executes).
EXPORTABLE_FORMATS = frozenset({"FP8_DEFAULT_CFG", "FP8_ALL_LAYERS_CFG"})
EXPORT_INFO_FILE = "autoquant_export.json"
EXPORT_INFO_VERSION = 1
# Tokenizer, processor and chat template files copied from the source checkpoint when present.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json",
)
FP8_DTYPE = torch.float8_e4m3fn


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    output_dir: Path
    info: dict[str, Any]


def check_exportable(run: RunArtifacts) -> None:
    """Refuse runs whose formats are not per-tensor FP8 or BF16 (the exporter/loader pair here)."""
    formats = {layer["format"] for layer in run.manifest["layers"].values()} - {NO_QUANT}
    bad = sorted(formats - EXPORTABLE_FORMATS)
    if bad:
        raise UserError(
            f"run {run.run_dir} uses {', '.join(bad)}, which export does not support; only per-tensor FP8 "
            f"({', '.join(sorted(EXPORTABLE_FORMATS))}) and BF16 layers are exported: re-run with one of those"
        )


def _check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export dir {out} exists and is not empty; pass a new --output-dir")


def _check_checkpoint(run: RunArtifacts, config: dict[str, Any], model_dir: Path, arch: str) -> dict[str, str]:
    """The checkpoint's identity (config hash, weights fingerprint), refused unless it is the run's."""
    from auto_quantize_model.models.fingerprint import weights_fingerprint
    from auto_quantize_model.models.loading import config_hash

    ident = {"config_hash": config_hash(config), "weights_fingerprint": weights_fingerprint(model_dir)}
    check_same_checkpoint(run, arch, ident["config_hash"], ident["weights_fingerprint"])
    return ident


def _quantized_target(full: nn.Module, scope: Scope) -> nn.Module:
    """The module the run's restore artifact describes, sharing its submodules with ``full``."""
    from auto_quantize_model.models.loading import LanguageModelWithHead, split_language_model

    if scope is Scope.WHOLE_VLM:
        return full
    decoder, lm_head = split_language_model(full)
    return LanguageModelWithHead(decoder, lm_head)


def _check_layers_match(target: nn.Module, run: RunArtifacts) -> int:
    """After export each FP8 layer of the manifest holds float8 weights and each BF16 layer does not."""
    wrong = []
    for name, layer in run.manifest["layers"].items():
        dtype = target.get_submodule(name).weight.dtype
        if (dtype == FP8_DTYPE) != (layer["dtype"] == "fp8"):
            wrong.append(f"{name} ({layer['dtype']} in manifest, {dtype} exported)")
    if wrong:
        raise RuntimeError(f"export does not match the manifest for {len(wrong)} layers, e.g. {wrong[:3]}")
    return sum(layer["dtype"] == "fp8" for layer in run.manifest["layers"].values())


def _read_tensors_meta(export_dir: Path) -> dict[str, tuple[torch.dtype, int]]:
    """dtype and byte size of every tensor in the export's safetensors files."""
    from safetensors import safe_open

    out = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_slice(k)
                dtype = getattr(torch, {"F8_E4M3": "float8_e4m3fn", "BF16": "bfloat16", "F32": "float32",
                                        "F16": "float16"}.get(t.get_dtype(), "float32"))
                numel = 1
                for d in t.get_shape():
                    numel *= d
                out[k] = (dtype, numel * torch.empty((), dtype=dtype).element_size())
    return out


def _vision_prefixes(keys: list[str]) -> list[str]:
    """Top-level module prefixes of the vision tower in the exported names (``visual``, ``model.visual``)."""
    return sorted({k[: k.index("visual.") + len("visual")] for k in keys if "visual." in k})


def _finish_configs(export_dir: Path, tensors: dict[str, tuple[torch.dtype, int]]) -> dict[str, Any]:
    """Exclude an unquantized vision tower and untie an FP8 lm_head; returns what was done."""
    keys = list(tensors)
    extra = [f"{p}*" for p in _vision_prefixes(keys)
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
    head_fp8 = tensors.get("lm_head.weight", (None, 0))[0] == FP8_DTYPE
    untied = False
    if head_fp8:
        for section in (cfg, cfg.get("text_config") or {}):
            if section.get("tie_word_embeddings"):
                section["tie_word_embeddings"] = False
                untied = True
    cfg_path.write_text(json.dumps(cfg, indent=4), encoding="utf-8")
    if head_fp8:
        head = "fp8, stored as its own tensor beside the BF16 embedding" + (" (untied)" if untied else "")
    else:
        head = "bf16" + ("" if "lm_head.weight" in tensors else ", tied to model.embed_tokens (stored once)")
    return {"excluded_vision_prefixes": extra, "lm_head": head}


def weight_bytes_summary(tensors: dict[str, tuple[torch.dtype, int]]) -> dict[str, int]:
    """Bytes of stored tensors: language model (everything outside the vision tower) and vision tower."""
    prefixes = _vision_prefixes(list(tensors))
    vision = {k for k in tensors if any(k.startswith(p + ".") for p in prefixes)}
    lm = {k: v for k, v in tensors.items() if k not in vision}
    return {
        "language_model_bytes": sum(b for _, b in lm.values()),
        "language_model_fp8_bytes": sum(b for d, b in lm.values() if d == FP8_DTYPE),
        "vision_bytes": sum(tensors[k][1] for k in vision),
        "total_bytes": sum(b for _, b in tensors.values()),
    }


def _copy_processor_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _normal_permissions(root: Path) -> None:
    """Others read exports: directories 0755, files 0644 (mkdtemp and safetensors write 0700/0600)."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def export_run(run_dir: str | Path, model_dir: str | Path, output_dir: str | Path, device: str = "cpu") -> ExportResult:
    """Write the run's scheme as a Hugging Face checkpoint of the whole model, atomically."""
    from modelopt.torch.export import export_hf_checkpoint

    from auto_quantize_model.autoquant.restore import apply_restore_artifact
    from auto_quantize_model.models.loading import (
        _model_class,
        load_whole_model,
        read_checkpoint_config,
        resolve_device,
    )

    run = find_run(run_dir)
    check_exportable(run)
    out = Path(output_dir)
    _check_output_dir(out)
    src = Path(model_dir)
    config = read_checkpoint_config(src)
    arch, _ = _model_class(config)
    ident = _check_checkpoint(run, config, src, arch)
    chash = ident["config_hash"]
    dev = resolve_device(device)
    t0 = time.perf_counter()
    # ModelOpt's exporter divides the weight by its scale in bf16 (FP8 fake quant multiplies in
    # float32), so ~2-4% of FP8 weights land one FP8 step away from the fake-quant model's; the export
    # is what serving engines load, so it is kept as ModelOpt writes it (tolerance: tests/test_export.py).
    full = load_whole_model(src, dev, torch.bfloat16)
    target = _quantized_target(full, Scope.of(run.manifest["model"]))
    apply_restore_artifact(target, run.restore_path, ident, run.manifest)
    t_load = time.perf_counter() - t0
    with atomic_directory(out) as tmp, torch.inference_mode(False), torch.no_grad():
        export_hf_checkpoint(full, dtype=torch.bfloat16, export_dir=tmp)
        num_fp8 = _check_layers_match(target, run)
        tensors = _read_tensors_meta(tmp)
        stored_fp8 = sum(d == FP8_DTYPE for k, (d, _) in tensors.items() if k.endswith(".weight"))
        if stored_fp8 != num_fp8:
            raise RuntimeError(f"export holds {stored_fp8} FP8 weights, the manifest {num_fp8}")
        fixes = _finish_configs(tmp, tensors)
        copied = _copy_processor_files(src, tmp)
        info = {
            "schema_version": EXPORT_INFO_VERSION,
            "run": {"name": run.name, "run_dir": str(run.run_dir.resolve()), "scheme": run.manifest["scheme"]["name"],
                    "effective_bits": run.manifest["effective_bits"]},
            "source": {"model_dir": str(src.resolve()), "architecture": arch, "config_hash": chash},
            "layers": {"fp8": num_fp8, "total": len(run.manifest["layers"])},
            **fixes,
            "weights": weight_bytes_summary(tensors),
            "copied_files": copied,
            "seconds": {"load_and_restore": t_load, "total": time.perf_counter() - t0},
            "device": str(dev),
            "versions": versions(),
            "git_revision": git_revision(),
        }
        atomic_write_json(tmp / EXPORT_INFO_FILE, info)
        _normal_permissions(tmp)
    log.info("exported %s to %s: %d/%d layers FP8, LM %.3g GB, %.1fs", run.name, out, num_fp8,
             len(run.manifest["layers"]), info["weights"]["language_model_bytes"] / 1e9, info["seconds"]["total"])
    return ExportResult(out, info)
