"""What an FP8 export must hold, read from its files: the export's own final check and every loader of an export
(``infer --exported``) run the same checks, so a tampered or truncated export is refused in one line instead of
generating text from NaN scales or silently ignoring tensors.

Checked: every ``.safetensors`` file parses; every FP8 weight belongs to a Linear of the model the config
describes and has a scalar float32 ``weight_scale`` and ``input_scale``, finite and positive; no tensor is named
that the config's model does not have (a Linear's two scales are the only additions); and no weight of that model
is missing (a tied lm_head may be stored once, as the embedding). An FP8 KV cache's scales may be stored per
attention layer, as ModelOpt names them (``<attn>.k_proj.k_scale``, ``<attn>.v_proj.v_scale``) or as
compressed-tensors does (``<attn>.k_scale``, ``<attn>.v_scale``), scalar float32, finite and positive.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.autoquant.serving import FP8_DTYPE
from auto_quantize_model.errors import UserError

SCALE_SUFFIXES = ("weight_scale", "input_scale")
KV_SCALE_SUFFIXES = ("k_scale", "v_scale")
_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}


@dataclass(frozen=True)
class TensorMeta:
    """A stored tensor's dtype and shape, and the file that holds it."""

    dtype: torch.dtype | str  # a torch dtype, or the safetensors name of one we do not map
    shape: tuple[int, ...]
    file: Path

    @property
    def nbytes(self) -> int:
        """Stored bytes (0 for an unmapped dtype)."""
        if not isinstance(self.dtype, torch.dtype):
            return 0
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def read_tensor_meta(export_dir: str | Path) -> dict[str, TensorMeta]:
    """Name -> dtype, shape and file of every tensor in the export's safetensors files (headers only)."""
    from safetensors import SafetensorError, safe_open

    d = Path(export_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d} holds no .safetensors weights; pass the output dir of `autoquant export`")
    out: dict[str, TensorMeta] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    if k in out:
                        raise UserError(f"{d}: tensor {k} is stored twice ({out[k].file.name}, {f.name}); re-export")
                    out[k] = TensorMeta(_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()), f)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{f} is not a readable safetensors file ({' '.join(str(exc).split())[:160]}); the export "
                            "is truncated or damaged: re-export it") from exc
    return out


def read_scales(meta: dict[str, TensorMeta]) -> dict[str, torch.Tensor]:
    """Every ``*_scale`` tensor of the export, loaded (they are scalars)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k, m in meta.items():
        if k.rsplit(".", 1)[-1] in SCALE_SUFFIXES + KV_SCALE_SUFFIXES:
            by_file.setdefault(m.file, []).append(k)
    for f, keys in by_file.items():
        try:
            with safe_open(str(f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in keys})
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{f} could not be read ({exc.__class__.__name__}); re-export it") from exc
    return out


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of the export, or one line saying it is missing or damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"{path.parent} has no {path.name}; pass the output dir of an `autoquant export`") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path} is damaged ({exc.__class__.__name__}); re-export the checkpoint") from exc
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object; re-export the checkpoint")
    return data


def checkpoint_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module or tensor names of ``model`` -> the names a checkpoint of it stores (transformers' own reversal of
    its load-time renaming, e.g. ``model.language_model.`` -> ``model.``, ``model.visual.`` -> ``visual.``)."""
    from transformers.core_model_loading import revert_weight_conversion

    probe = {f"{n}.weight": torch.empty(0) for n in names}
    reverted = revert_weight_conversion(model, dict(probe))
    if len(reverted) != len(probe):
        raise RuntimeError("transformers' checkpoint renaming is not one-to-one for these modules")
    # The reversal keeps each tensor object: map every renamed key back to its module through the tensor's identity.
    by_tensor = {id(t): k for k, t in reverted.items()}
    return {n: by_tensor[id(probe[f"{n}.weight"])].removesuffix(".weight") for n in names}


def runtime_names(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Checkpoint prefixes of Linears of ``model`` -> their module names in ``model`` (the inverse of
    :func:`checkpoint_names`)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    back = {v: k for k, v in checkpoint_names(model, linears).items()}
    return [back[p] for p in prefixes]


def expected_tensors(model: nn.Module) -> tuple[set[str], set[str], set[str]]:
    """(weights and buffers a checkpoint of ``model`` stores, the Linears' checkpoint prefixes, tied keys that
    may be stored once), all in checkpoint names."""
    sd_names = [k.removesuffix(".weight") for k in model.state_dict() if k.endswith(".weight")]
    other = [k for k in model.state_dict() if not k.endswith(".weight")]
    names = checkpoint_names(model, sd_names)
    keys = {f"{v}.weight" for v in names.values()}
    if other:
        from transformers.core_model_loading import revert_weight_conversion

        keys |= set(revert_weight_conversion(model, {k: torch.empty(0) for k in other}))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear_names = checkpoint_names(model, sorted(linears))
    tied: set[str] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        tied = {f"{linear_names[n]}.weight" for n, m in model.named_modules() if m is out_emb}
    return keys, set(linear_names.values()), tied


def config_model(export_dir: str | Path) -> nn.Module:
    """The (empty, meta-device) model the export's config.json describes, built as a plain BF16 model."""
    from transformers import AutoConfig

    from auto_quantize_model.models.loading import model_class, read_checkpoint_config

    d = Path(export_dir)
    _, cls = model_class(read_checkpoint_config(d))
    try:
        config = AutoConfig.from_pretrained(str(d))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{d}/config.json is not a valid model config ({exc.__class__.__name__}); re-export") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the FP8 layers are the loader's to build
    with torch.device("meta"):
        return cls._from_config(config, dtype=torch.bfloat16)


def kv_scale_names(linears: set[str]) -> set[str]:
    """Every name an FP8 KV cache's scales may have, for each attention layer with ``k_proj`` and ``v_proj``."""
    attn = {p.rsplit(".", 1)[0] for p in linears if p.endswith(".k_proj") and f"{p[:-7]}.v_proj" in linears}
    return {n for a in attn for n in (f"{a}.k_proj.k_scale", f"{a}.v_proj.v_scale", f"{a}.k_scale", f"{a}.v_scale")}


def stored_kv_scales(meta: dict[str, TensorMeta]) -> list[str]:
    """Names of the stored tensors that are KV-cache scales."""
    return sorted(k for k in meta if k.rsplit(".", 1)[-1] in KV_SCALE_SUFFIXES)


def _check_scale(d: Path, name: str, t: torch.Tensor | None, what: str) -> None:
    if t is None:
        raise UserError(f"{d}: {what} has no {name.rsplit('.', 1)[-1]}; the export is incomplete: re-export")
    if t.dtype != torch.float32 or t.numel() != 1:
        raise UserError(f"{d}: {name} is {t.dtype} of shape {tuple(t.shape)}, not one float32 per-tensor scale; "
                        "re-export")
    v = float(t.reshape(()))
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{d}: {name} is {v}, not a finite positive scale; the export is damaged: re-export")


def check_export_tensors(export_dir: str | Path, meta: dict[str, TensorMeta], model: nn.Module | None = None) -> \
        list[str]:
    """Refuse (one line) an export whose tensors do not fit the model its config describes (``model``, else
    :func:`config_model`); returns the checkpoint prefixes of its FP8 layers."""
    d = Path(export_dir)
    model = config_model(d) if model is None else model
    keys, linears, tied = expected_tensors(model)
    fp8 = sorted(k.removesuffix(".weight") for k, m in meta.items() if k.endswith(".weight") and m.dtype == FP8_DTYPE)
    not_linear = [p for p in fp8 if p not in linears]
    if not_linear:
        raise UserError(f"{d}: FP8 tensor {not_linear[0]}.weight is not a Linear of the model its config describes; "
                        "only per-tensor FP8 Linears are supported: re-export")
    allowed = keys | {f"{p}.{s}" for p in fp8 for s in SCALE_SUFFIXES} | kv_scale_names(linears)
    extra = sorted(set(meta) - allowed)
    if extra:
        raise UserError(f"{d} holds {len(extra)} tensors its config does not name (e.g. {extra[0]}); the export was "
                        "altered or is for another model: re-export")
    missing = sorted(keys - set(meta) - tied)
    if missing:
        raise UserError(f"{d} lacks {len(missing)} tensors its config names (e.g. {missing[0]}); re-export")
    scales = read_scales(meta)
    for p in fp8:
        for s in SCALE_SUFFIXES:
            _check_scale(d, f"{p}.{s}", scales.get(f"{p}.{s}"), f"FP8 layer {p}")
    for name in stored_kv_scales(meta):
        _check_scale(d, name, scales.get(name), "KV-cache scale")
    return fp8
