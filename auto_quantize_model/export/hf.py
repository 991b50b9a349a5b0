"""``autoquant export``: a run's FP8/BF16 layer choice as a whole-VLM Hugging Face checkpoint, equal to the model
the run evaluated.

The weights come from the original checkpoint, the quantizer scales from the run's restore artifact, the file
layout and configs from ModelOpt's own exporter (``export_hf_checkpoint``: safetensors with FP8 weights plus
``weight_scale``/``input_scale``, ``hf_quant_config.json``, ``quantization_config`` in config.json) -- the format
vLLM, TensorRT-LLM and SGLang load for ModelOpt checkpoints. Every FP8 tensor ModelOpt wrote is then replaced by
the codes and scales fake quantization used (``export/fp8_codes.py``): ModelOpt's exporter divides weights by
their scale in bf16 and rounds a few % of them one FP8 step away from the evaluated model. Names, dtypes,
shapes and configs stay ModelOpt's.

Done here besides: the vision tower, when the run searched the language model only, has no quantizers, so the
exporter does not list it as excluded: it is added to the exclusions. A tied lm_head (Qwen2.5-VL-3B) that the run
made FP8 can no longer share the BF16 embedding: both tensors are kept and ``tie_word_embeddings`` is turned off.
A BF16 lm_head stays tied and is stored once. The final check (``export/checks.py``, the same one ``infer
--exported`` runs) reads the files back. Every refusal is one line before anything is written; a failure while
writing (full disk, read-only or special directory) is one line and leaves only the temporary directory's
removal behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.autoquant.manifest import NO_QUANT
from auto_quantize_model.autoquant.rebuild import RunArtifacts, check_same_checkpoint, find_run
from auto_quantize_model.errors import UserError
from auto_quantize_model.export.checks import TensorMeta, check_export_tensors, checkpoint_names, read_tensor_meta
from auto_quantize_model.export.configs import finish_configs
from auto_quantize_model.export.fp8_codes import FP8_DTYPE, fp8_layer_tensors
from auto_quantize_model.io_utils import atomic_directory, atomic_write_json, current_umask
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.provenance import git_revision, versions

log = logging.getLogger(__name__)

# Formats whose export is per-tensor FP8 E4M3 weights and activations (what fp8_linear executes).
EXPORTABLE_FORMATS = frozenset({"FP8_DEFAULT_CFG", "FP8_ALL_LAYERS_CFG"})
EXPORT_INFO_FILE = "autoquant_export.json"
EXPORT_INFO_VERSION = 2
# Tokenizer, processor and chat template files copied from the source checkpoint when present.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json",
)
# A run made before the manifest recorded its serving semantics calibrated separate scales.
LEGACY_FUSED_SCALES = "separate"


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    output_dir: Path
    info: dict[str, Any]


@dataclass(frozen=True)
class ExportPlan:
    """What the manifest says the export must hold, read and checked once before anything is loaded."""

    run: RunArtifacts
    scope: Scope
    fp8_layers: tuple[str, ...]  # manifest (searched-module) names
    num_layers: int
    fused_scales: str
    serving_recorded: bool


def _manifest_plan(run: RunArtifacts) -> ExportPlan:
    """The fields export reads, each checked (a hand-edited or truncated manifest gets one line, not a traceback)."""
    m = run.manifest
    where = f"manifest of {run.run_dir}"
    model = m.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("architecture", "config_hash")):
        raise UserError(f"{where} has no model architecture/config_hash; it is damaged: re-run the scheme")
    try:
        scope = Scope.of(model)
    except ValueError as exc:
        raise UserError(f"{where} names an unknown scope {model.get('scope')!r}; re-run the scheme") from exc
    if not isinstance(m.get("scheme", {}).get("name"), str) or not isinstance(m.get("artifacts"), dict):
        raise UserError(f"{where} has no scheme name or artifacts; it is damaged: re-run the scheme")
    fp8 = []
    for name, layer in m["layers"].items():
        if not isinstance(layer, dict) or not isinstance(layer.get("dtype"), str) or not isinstance(
                layer.get("format"), str):
            raise UserError(f"{where}: layer {name} has no dtype/format; it is damaged: re-run the scheme")
        if layer["dtype"] == "fp8":
            fp8.append(name)
    serving = m.get("serving")
    mode = serving.get("fused_scales") if isinstance(serving, dict) else None
    if mode is not None and mode not in ("shared", "separate"):
        raise UserError(f"{where} names an unknown fused_scales {mode!r}; re-run the scheme")
    return ExportPlan(run, scope, tuple(fp8), len(m["layers"]), mode or LEGACY_FUSED_SCALES, mode is not None)


def check_exportable(run: RunArtifacts) -> None:
    """Refuse runs with layers the FP8 export cannot write: formats other than per-tensor FP8 or BF16, and
    quantized layers that are not Linears (a whole-VLM run made before searches left the patch embedding out)."""
    formats = {layer["format"] for layer in run.manifest["layers"].values()} - {NO_QUANT}
    bad = sorted(formats - EXPORTABLE_FORMATS)
    if bad:
        raise UserError(
            f"run {run.run_dir} uses {', '.join(bad)}, which export does not support; only per-tensor FP8 "
            f"({', '.join(sorted(EXPORTABLE_FORMATS))}) and BF16 layers are exported: re-run with one of those"
        )
    conv = sorted(n for n, lay in run.manifest["layers"].items() if lay["dtype"] != "bf16" and lay.get("kind") ==
                  "patch_embed")
    if conv:
        raise UserError(f"run {run.run_dir} quantized {conv[0]}, a convolution the FP8 export writes in BF16 (so the "
                        "export would not be the evaluated model); re-run the scheme: searches now leave it out")


def _check_output_dir(out: Path) -> None:
    """Refuse, before loading anything, an output dir that exists, is a link, or cannot be written to."""
    if out.is_symlink():
        raise UserError(f"export dir {out} is a symbolic link; pass a new directory path (not a link) as --output-dir")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export dir {out} exists and is not empty; pass a new --output-dir")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write the export next to {out} ({exc.strerror or exc}); pass a writable "
                        "--output-dir") from exc


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[Path]:
    """``atomic_directory``, with every write failure (disk full, permissions, I/O) turned into one line; the
    temporary directory is removed, so nothing complete-looking stays behind."""
    from safetensors import SafetensorError

    try:
        with atomic_directory(out) as tmp:
            yield tmp
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160]
        raise UserError(f"could not write the export to {out} ({reason}); nothing was kept: free space or pass a "
                        "writable --output-dir") from exc


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


def _fp8_tensors(full: nn.Module, target: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor for every FP8 layer of the manifest, as fake quantization computes them."""
    full_name = {id(m): n for n, m in full.named_modules()}
    names: dict[str, str] = {}
    for name in plan.fp8_layers:
        try:
            module = target.get_submodule(name)
        except AttributeError as exc:
            raise UserError(f"manifest of {plan.run.run_dir} names layer {name}, which the checkpoint does not have; "
                            "pass the checkpoint the run used") from exc
        names[name] = full_name[id(module)]
    ckpt = checkpoint_names(full, sorted(names.values()))
    out: dict[str, torch.Tensor] = {}
    for name, fname in names.items():
        try:
            t = fp8_layer_tensors(target.get_submodule(name))
        except ValueError as exc:
            raise UserError(f"layer {name} {exc}, though the manifest says FP8; the restore artifact does not match "
                            "its manifest: re-run the scheme") from exc
        prefix = ckpt[fname]
        out.update({f"{prefix}.weight": t.weight.cpu(), f"{prefix}.weight_scale": t.weight_scale.cpu(),
                    f"{prefix}.input_scale": t.input_scale.cpu()})
    return out


def _overwrite_tensors(export_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace ``tensors`` in the safetensors files that hold them (names, dtypes, shapes and metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    meta = read_tensor_meta(export_dir)
    absent = sorted(set(tensors) - set(meta))
    if absent:
        raise RuntimeError(f"ModelOpt's exporter wrote no {absent[0]} ({len(absent)} FP8 tensors missing)")
    for f in sorted({meta[k].file for k in tensors}):
        with safe_open(str(f), "pt") as fh:
            metadata = fh.metadata()
        data = load_file(str(f))
        for k in (k for k in tensors if meta[k].file == f):
            new = tensors[k]
            if new.dtype != data[k].dtype or new.numel() != data[k].numel():
                raise RuntimeError(f"{k}: computed {new.dtype} {tuple(new.shape)}, ModelOpt wrote {data[k].dtype} "
                                   f"{tuple(data[k].shape)}")
            data[k] = new.reshape(data[k].shape).contiguous()
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(data, str(tmp), metadata=metadata)
        os.replace(tmp, f)


def weight_bytes_summary(tensors: dict[str, TensorMeta]) -> dict[str, int]:
    """Bytes of stored tensors: language model (everything outside the vision tower) and vision tower."""
    from auto_quantize_model.export.configs import vision_prefixes

    prefixes = vision_prefixes(list(tensors))
    vision = {k for k in tensors if any(k.startswith(p + ".") for p in prefixes)}
    lm = {k: v for k, v in tensors.items() if k not in vision}
    return {
        "language_model_bytes": sum(m.nbytes for m in lm.values()),
        "language_model_fp8_bytes": sum(m.nbytes for m in lm.values() if m.dtype == FP8_DTYPE),
        "vision_bytes": sum(tensors[k].nbytes for k in vision),
        "total_bytes": sum(m.nbytes for m in tensors.values()),
    }


def _copy_processor_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _umask_permissions(root: Path) -> None:
    """Every result follows the umask (0777/0666 minus it): safetensors writes 0600, mkdtemp 0700."""
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _final_check(export_dir: Path, full: nn.Module, plan: ExportPlan, written: dict[str, torch.Tensor]) -> \
        dict[str, TensorMeta]:
    """Read the export back: the same checks as every loader, the manifest's FP8 layers and nothing else in FP8,
    each FP8 tensor as computed, and (shared) one scale per fused group."""
    from safetensors import safe_open

    from auto_quantize_model.autoquant.serving import fused_groups

    meta = read_tensor_meta(export_dir)
    fp8 = check_export_tensors(export_dir, meta)
    want = sorted(k.removesuffix(".weight") for k in written if k.endswith(".weight"))
    if fp8 != want:
        raise RuntimeError(f"export holds {len(fp8)} FP8 layers, the manifest {len(want)} "
                           f"(e.g. {sorted(set(fp8) ^ set(want))[:3]})")
    for f in sorted({meta[k].file for k in written}):
        with safe_open(str(f), "pt") as fh:
            for k in (k for k in written if meta[k].file == f):
                if not torch.equal(fh.get_tensor(k).reshape(-1).view(torch.uint8),
                                   written[k].reshape(-1).view(torch.uint8)):
                    raise RuntimeError(f"{k} was not written as computed")
    if plan.fused_scales == "shared":
        names = checkpoint_names(full, [n for g in fused_groups(full) for n in g])
        for group in fused_groups(full):
            keys = [names[n] for n in group]
            if all(k in fp8 for k in keys):
                for s in ("weight_scale", "input_scale"):
                    if len({float(written[f"{k}.{s}"]) for k in keys}) != 1:
                        raise RuntimeError(f"fused group {keys} has different {s}s in a shared-scales run")
    return meta


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
    plan = _manifest_plan(run)
    check_exportable(run)
    out = Path(output_dir)
    _check_output_dir(out)
    src = Path(model_dir)
    config = read_checkpoint_config(src)
    arch, _ = _model_class(config)
    ident = _check_checkpoint(run, config, src, arch)
    dev = resolve_device(device)
    if not plan.serving_recorded:
        log.warning("run %s predates the manifest's serving section: its q/k/v and gate/up scales are separate, and "
                    "engines that fuse them requantize to the group's max (re-run the scheme to export shared scales)",
                    run.name)
    t0 = time.perf_counter()
    full = load_whole_model(src, dev, torch.bfloat16)
    target = _quantized_target(full, plan.scope)
    apply_restore_artifact(target, run.restore_path, ident, run.manifest)
    with torch.no_grad():
        tensors = _fp8_tensors(full, target, plan)
    t_load = time.perf_counter() - t0
    with _writing(out) as tmp, torch.inference_mode(False), torch.no_grad():
        export_hf_checkpoint(full, dtype=torch.bfloat16, export_dir=tmp)
        _overwrite_tensors(tmp, tensors)
        fixes = finish_configs(tmp, read_tensor_meta(tmp))
        copied = _copy_processor_files(src, tmp)
        meta = _final_check(tmp, full, plan, tensors)
        num_fp8 = len(plan.fp8_layers)
        info = {
            "schema_version": EXPORT_INFO_VERSION,
            "run": {"name": run.name, "run_dir": str(run.run_dir.resolve()), "scheme": run.manifest["scheme"]["name"],
                    "effective_bits": run.manifest.get("effective_bits")},
            "source": {"model_dir": str(src.resolve()), "architecture": arch, "config_hash": ident["config_hash"],
                       "weights_fingerprint": ident["weights_fingerprint"]},
            "layers": {"fp8": num_fp8, "total": plan.num_layers},
            "serving": {"fused_scales": plan.fused_scales, "recorded_in_manifest": plan.serving_recorded,
                        "fp8_tensors": "the evaluated fake-quant codes and dequantization scales "
                                       "(export/fp8_codes.py), not ModelOpt's bf16 rounding"},
            **fixes,
            "weights": weight_bytes_summary(meta),
            "copied_files": copied,
            "seconds": {"load_and_restore": t_load, "total": time.perf_counter() - t0},
            "device": str(dev),
            "versions": versions(),
            "git_revision": git_revision(),
        }
        atomic_write_json(tmp / EXPORT_INFO_FILE, info)
        _umask_permissions(tmp)
    log.info("exported %s to %s: %d/%d layers FP8 (%s fused scales), LM %.3g GB, %.1fs", run.name, out, num_fp8,
             plan.num_layers, plan.fused_scales, info["weights"]["language_model_bytes"] / 1e9,
             info["seconds"]["total"])
    return ExportResult(out, info)
