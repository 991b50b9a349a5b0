"""``autoquant export``: a run's FP8/BF16 layer choice as a whole-VLM Hugging Face checkpoint, equal to the model
the run evaluated, in one of two formats (``--format``).

The weights come from the original checkpoint, the quantizer scales from the run's restore artifact, and every FP8
tensor is what fake quantization used (``export/fp8_codes.py``: codes ``fp8(w * S)``, scales ``1 / S``), in either
format:
- ``modelopt`` (default; ``export/modelopt_format.py``): ModelOpt's own exporter (``export_hf_checkpoint``) writes
  the layout and configs (safetensors with FP8 weights plus ``weight_scale``/``input_scale``,
  ``hf_quant_config.json``, ``quantization_config`` in config.json) -- the format vLLM, TensorRT-LLM and SGLang load
  for ModelOpt checkpoints --, then its FP8 tensors are replaced by the evaluated ones (its exporter divides weights
  by their scale in bf16 and rounds a few % of them one FP8 step away). Names, dtypes, shapes and configs stay
  ModelOpt's. The vision tower, when the run searched the language model only, is added to the exclusions.
- ``compressed-tensors`` (``export/compressed_tensors.py``): llm-compressor's static per-tensor FP8 format, written
  through the ``compressed-tensors`` library, holding the same codes and (float32) scales.

In both, a tied lm_head (Qwen2.5-VL-3B) that the run made FP8 can no longer share the BF16 embedding: both tensors
are kept and ``tie_word_embeddings`` is turned off; a BF16 lm_head stays tied and is stored once. ``--kv-cache
fp8`` adds per-layer K/V scales calibrated on the run's own data (``export/kv_cache.py``). ``README_LOADING.md``
beside the weights says which loaders read the format (``export/loading_notes.py``). The final check
(``export/checks.py``, the same one ``infer --exported`` runs, plus the format's config) reads the files back.
Every refusal is one line before anything is written; a failure while writing (full disk, read-only or special
directory) is one line and leaves only the temporary directory's removal behind.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.autoquant.layers import is_quantized_label
from auto_quantize_model.autoquant.manifest import NO_QUANT
from auto_quantize_model.autoquant.rebuild import RunArtifacts, check_same_checkpoint, find_run
from auto_quantize_model.autoquant.serving import FP8_DTYPE
from auto_quantize_model.errors import UserError
from auto_quantize_model.export.checks import (
    TensorMeta,
    check_export_tensors,
    checkpoint_names,
    read_tensor_meta,
    stored_kv_scales,
)
from auto_quantize_model.export.compressed_tensors import Fp8Layer
from auto_quantize_model.export.fp8_codes import fp8_layer_tensors
from auto_quantize_model.export.kv_cache import KvCacheScales
from auto_quantize_model.export.settings import COMPRESSED_TENSORS, ExportOptions
from auto_quantize_model.io_utils import atomic_write_json, atomic_write_text
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.provenance import git_revision, package_version, versions

log = logging.getLogger(__name__)

# Formats whose export is per-tensor FP8 E4M3 weights and activations (what fp8_linear executes).
EXPORTABLE_FORMATS = frozenset({"FP8_DEFAULT_CFG", "FP8_ALL_LAYERS_CFG"})
EXPORT_INFO_FILE = "autoquant_export.json"
EXPORT_INFO_VERSION = 3  # 3: format, kv_cache, loaders
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


def export_blocker(manifest: dict[str, Any], run_dir: str | Path) -> str | None:
    """Why the FP8 export cannot write this run (one line), or None: formats other than per-tensor FP8 or BF16, and
    quantized layers that are not Linears (a whole-VLM run made before searches left the patch embedding out). Only
    the manifest is judged; the checkpoint is checked when an export runs. The trials table's ``exportable``."""
    formats = {layer["format"] for layer in manifest["layers"].values()} - {NO_QUANT}
    bad = sorted(formats - EXPORTABLE_FORMATS)
    if bad:
        return (f"run {run_dir} uses {', '.join(bad)}, which export does not support; only per-tensor FP8 "
                f"({', '.join(sorted(EXPORTABLE_FORMATS))}) and BF16 layers are exported: re-run with one of those")
    # An unquantized layer is labelled by the run's dtype ("fp32" on a float32 CPU run), not always "bf16".
    conv = sorted(n for n, lay in manifest["layers"].items() if is_quantized_label(lay["dtype"]) and
                  lay.get("kind") == "patch_embed")
    if conv:
        return (f"run {run_dir} quantized {conv[0]}, a convolution the FP8 export writes in BF16 (so the export "
                "would not be the evaluated model); re-run the scheme: searches now leave it out")
    return None


def check_exportable(run: RunArtifacts) -> None:
    """Refuse, in one line, a run the FP8 export cannot write (:func:`export_blocker`)."""
    why = export_blocker(run.manifest, run.run_dir)
    if why is not None:
        raise UserError(why)


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


def _fp8_layers(full: nn.Module, target: nn.Module, plan: ExportPlan) -> list[Fp8Layer]:
    """Every FP8 layer of the manifest: its runtime and checkpoint names and its tensors as fake quantization
    computes them (on the host)."""
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
    out = []
    for name, fname in names.items():
        try:
            t = fp8_layer_tensors(target.get_submodule(name))
        except ValueError as exc:
            raise UserError(f"layer {name} {exc}, though the manifest says FP8; the restore artifact does not match "
                            "its manifest: re-run the scheme") from exc
        out.append(Fp8Layer(fname, ckpt[fname], type(t)(t.weight.cpu(), t.weight_scale.cpu(), t.input_scale.cpu())))
    return out


def _written(layers: list[Fp8Layer]) -> dict[str, torch.Tensor]:
    """Checkpoint name -> evaluated tensor, for every FP8 layer's weight and two scales."""
    out = {}
    for layer in layers:
        t = layer.tensors
        out.update({f"{layer.checkpoint}.weight": t.weight, f"{layer.checkpoint}.weight_scale": t.weight_scale,
                    f"{layer.checkpoint}.input_scale": t.input_scale})
    return out


def _attention_prefixes(full: nn.Module) -> list[str]:
    """Checkpoint prefix of every decoder layer's attention module, in layer order."""
    from auto_quantize_model.models.loading import split_language_model

    decoder, _ = split_language_model(full)
    full_name = {id(m): n for n, m in full.named_modules()}
    attn = [full_name[id(layer.self_attn)] for layer in decoder.layers]
    names = checkpoint_names(full, [f"{a}.k_proj" for a in attn])
    return [names[f"{a}.k_proj"].removesuffix(".k_proj") for a in attn]


def _final_check(export_dir: Path, model: nn.Module, plan: ExportPlan, layers: list[Fp8Layer],
                 kv: KvCacheScales | None, options: ExportOptions) -> dict[str, TensorMeta]:
    """Read the export back: the same checks as every loader, the manifest's FP8 layers and nothing else in FP8,
    each FP8 tensor (and KV scale) as computed, (shared) one scale per fused group, and the format's config."""
    from safetensors import safe_open

    from auto_quantize_model.autoquant.serving import fused_groups
    from auto_quantize_model.export import compressed_tensors, modelopt_format

    meta = read_tensor_meta(export_dir)
    fp8 = check_export_tensors(export_dir, meta)
    written = _written(layers)
    if kv is not None:
        prefixes = _attention_prefixes(model)
        kv_names = ([(f"{p}.k_scale", f"{p}.v_scale") for p in prefixes] if options.format == COMPRESSED_TENSORS
                    else modelopt_format.kv_tensor_names(prefixes))
        for i, (k_name, v_name) in enumerate(kv_names):
            written.update({k_name: kv.tensor("k", i), v_name: kv.tensor("v", i)})
    want = sorted(layer.checkpoint for layer in layers)
    if fp8 != want:
        raise RuntimeError(f"export holds {len(fp8)} FP8 layers, the manifest {len(want)} "
                           f"(e.g. {sorted(set(fp8) ^ set(want))[:3]})")
    kv_stored = stored_kv_scales(meta)
    if sorted(k for k in written if k.rsplit(".", 1)[-1] in ("k_scale", "v_scale")) != kv_stored:
        raise RuntimeError(f"export holds {len(kv_stored)} KV-cache scales, {0 if kv is None else 2 * kv.num_layers} "
                           "were computed")
    for f in sorted({meta[k].file for k in written}):
        with safe_open(str(f), "pt") as fh:
            for k in (k for k in written if meta[k].file == f):
                if not torch.equal(fh.get_tensor(k).reshape(-1).view(torch.uint8),
                                   written[k].reshape(-1).view(torch.uint8)):
                    raise RuntimeError(f"{k} was not written as computed")
    if plan.fused_scales == "shared":
        ckpt = checkpoint_names(model, [n for g in fused_groups(model) for n in g])
        for group in fused_groups(model):
            keys = [ckpt[n] for n in group]
            if all(k in fp8 for k in keys):
                for s in ("weight_scale", "input_scale"):
                    if len({float(written[f"{k}.{s}"]) for k in keys}) != 1:
                        raise RuntimeError(f"fused group {keys} has different {s}s in a shared-scales run")
    if options.format == COMPRESSED_TENSORS:
        from auto_quantize_model.export.checks import config_model

        compressed_tensors.check_config(export_dir, config_model(export_dir), {x.runtime for x in layers},
                                        bool(kv_stored))
    else:
        modelopt_format.check_kv_declared(export_dir, bool(kv_stored))
    return meta


def _calibrate_kv(full: nn.Module, run: RunArtifacts, src: Path, dev: torch.device) -> KvCacheScales:
    from auto_quantize_model.export.kv_cache import calibrate_kv_cache
    from auto_quantize_model.models.loading import load_tokenizer, split_language_model

    decoder, _ = split_language_model(full)
    return calibrate_kv_cache(decoder, run.manifest, load_tokenizer(src), dev)


def export_run(run_dir: str | Path, model_dir: str | Path, output_dir: str | Path, device: str = "cpu",
               format: str = "modelopt", kv_cache: str = "none") -> ExportResult:
    """Write the run's scheme as a Hugging Face checkpoint of the whole model in ``format``, atomically."""
    from auto_quantize_model.autoquant.restore import apply_restore_artifact
    from auto_quantize_model.export import files, loading_notes
    from auto_quantize_model.export.compressed_tensors import write_compressed_tensors
    from auto_quantize_model.export.modelopt_format import SGLANG_KV_WARNING, write_modelopt
    from auto_quantize_model.models.loading import (
        load_whole_model,
        model_class,
        read_checkpoint_config,
        resolve_device,
    )

    options = ExportOptions(format=format, kv_cache=kv_cache)
    run = find_run(run_dir)
    plan = _manifest_plan(run)
    check_exportable(run)
    out = Path(output_dir)
    files.check_output_dir(out)
    src = Path(model_dir)
    config = read_checkpoint_config(src)
    arch, _ = model_class(config)
    ident = _check_checkpoint(run, config, src, arch)
    dev = resolve_device(device)
    kv_on = options.kv_cache == "fp8"
    if not plan.serving_recorded:
        log.warning("run %s predates the manifest's serving section: its q/k/v and gate/up scales are separate, and "
                    "engines that fuse them requantize to the group's max (re-run the scheme to export shared scales)",
                    run.name)
    if kv_on and options.format != COMPRESSED_TENSORS:
        log.warning(SGLANG_KV_WARNING)
    t0 = time.perf_counter()
    full = load_whole_model(src, dev, torch.bfloat16)
    target = _quantized_target(full, plan.scope)
    apply_restore_artifact(target, run.restore_path, ident, run.manifest)
    with torch.no_grad():
        layers = _fp8_layers(full, target, plan)
        kv = _calibrate_kv(full, run, src, dev) if kv_on else None
    t_load = time.perf_counter() - t0
    with files.writing(out) as tmp, torch.inference_mode(False), torch.no_grad():
        if options.format == COMPRESSED_TENSORS:
            # The plain model, written through compressed-tensors; ModelOpt's quantizers stay out of it.
            del target, full
            gc.collect()
            full = load_whole_model(src, torch.device("cpu"), torch.bfloat16)
            fixes = write_compressed_tensors(full, layers, kv, tmp)
        else:
            fixes = write_modelopt(full, _written(layers), kv, _attention_prefixes(full) if kv else [], tmp)
        copied = files.copy_processor_files(src, tmp)
        meta = _final_check(tmp, full, plan, layers, kv, options)
        info = {
            "schema_version": EXPORT_INFO_VERSION,
            "format": options.format,
            "run": {"name": run.name, "run_dir": str(run.run_dir.resolve()), "scheme": run.manifest["scheme"]["name"],
                    "effective_bits": run.manifest.get("effective_bits")},
            "source": {"model_dir": str(src.resolve()), "architecture": arch, "config_hash": ident["config_hash"],
                       "weights_fingerprint": ident["weights_fingerprint"]},
            "layers": {"fp8": len(layers), "total": plan.num_layers},
            "serving": {"fused_scales": plan.fused_scales, "recorded_in_manifest": plan.serving_recorded,
                        "fp8_tensors": "the evaluated fake-quant codes and dequantization scales "
                                       "(export/fp8_codes.py), not ModelOpt's bf16 rounding"},
            "kv_cache": kv.describe() if kv is not None else {"dtype": "bf16 (not declared; engines' default)"},
            **fixes,
            "loaders": loading_notes.describe(options.format, kv_on),
            "weights": weight_bytes_summary(meta),
            "copied_files": copied,
            "seconds": {"load_and_restore": t_load, "total": time.perf_counter() - t0},
            "device": str(dev),
            # compressed-tensors writes the second format; the other versions are every record's.
            "versions": {**versions(), "compressed-tensors": package_version("compressed-tensors")},
            "git_revision": git_revision(),
        }
        note = loading_notes.loading_note(options.format, kv_on, str(out), kv is None or bool(kv.source["calibrated"]))
        atomic_write_text(tmp / loading_notes.LOADING_FILE, note)
        atomic_write_json(tmp / EXPORT_INFO_FILE, info)
        files.umask_permissions(tmp)
    log.info("exported %s to %s (%s): %d/%d layers FP8 (%s fused scales), KV cache %s, LM %.3g GB, %.1fs", run.name,
             out, options.format, len(layers), plan.num_layers, plan.fused_scales, "fp8" if kv_on else "bf16",
             info["weights"]["language_model_bytes"] / 1e9, info["seconds"]["total"])
    return ExportResult(out, info)
