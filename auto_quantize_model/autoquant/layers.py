"""What each LM Linear is (block index, kind) and what the quantized model really runs it in.

The dtype of a layer is read from its live quantizers, never from the search result: a layer is FP8
when its weight quantizer is enabled with ``num_bits == (4, 3)``. A test cross-checks the two. A layer left
unquantized runs in the model's own dtype, and the manifest says which (``bf16``, ``fp16``, ``fp32``): a float32
CPU run's unquantized layers are ``fp32``, not ``bf16``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

_BLOCK = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")
KINDS = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "lm_head": "lm_head",
}
# What a live quantizer that is off is labelled; the manifest replaces it by the run's dtype (unquantized_label).
UNQUANTIZED = "unquantized"
# torch dtype name -> the label of a layer that runs unquantized in it.
_DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
UNQUANTIZED_LABELS = frozenset(_DTYPE_LABELS.values()) | {UNQUANTIZED}


def unquantized_label(dtype: Any) -> str:
    """The label of a layer left unquantized in a model of ``dtype`` (``torch.float32``/``"float32"``: ``fp32``)."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_LABELS.get(name, name)


def is_quantized_label(label: str) -> bool:
    """True for a quantized format label (fp8, nvfp4, int4+fp8, ...), false for an unquantized dtype label."""
    return label not in UNQUANTIZED_LABELS


def block_index(name: str) -> int | None:
    """Decoder block number of a module name, or None (lm_head)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def layer_kind(name: str) -> str:
    """q, k, v, o, gate, up, down, lm_head; in vision towers also qkv, proj, merger_<i>, patch_embed."""
    leaf = name.rsplit(".", 1)[-1]
    if ".merger." in name:
        return f"merger_{leaf}"
    if "patch_embed" in name:
        return "patch_embed"
    return KINDS.get(leaf, leaf)


def layer_tower(name: str) -> str:
    """Which part of a VLM a module belongs to: vision, merger or language."""
    if "visual" in name or "vision_tower" in name or "vision_model" in name:
        return "merger" if "merger" in name else "vision"
    return "language"


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear (and convolution, e.g. a vision patch embedding) of the model, in module order.

    Quantized Linears subclass nn.Linear, so this is the same set before and after quantization.
    """
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _label(bits: Any, block_sizes: Any) -> str:
    """Our name for one quantizer setting (fp8, nvfp4, mxfp8, int8, int4, ...); ValueError if unknown."""
    scale_bits = block_sizes.get("scale_bits") if isinstance(block_sizes, dict) else None
    if isinstance(bits, list):
        bits = tuple(bits)
    if bits == (4, 3):
        return "mxfp8" if scale_bits == (8, 0) else "fp8"
    if bits == (2, 1):
        return "mxfp4" if scale_bits == (8, 0) else "nvfp4"
    if isinstance(bits, tuple) and len(bits) == 2 and all(isinstance(b, int) for b in bits):
        return f"fp{sum(bits) + 1}_e{bits[0]}m{bits[1]}"
    if isinstance(bits, int) and not isinstance(bits, bool):
        return f"int{bits}"
    raise ValueError(f"num_bits {bits!r}")


def quantizer_label(quantizer: Any) -> str:
    """What a quantizer does: fp8, nvfp4, mxfp8, int8, int4, ... or ``UNQUANTIZED`` when off.

    A ``SequentialQuantizer`` (e.g. W4A8 AWQ: int4 then fp8 on the weight) is labelled by its enabled
    stages joined with ``+`` (``int4+fp8``).
    """
    if quantizer is None:
        return UNQUANTIZED
    if isinstance(quantizer, nn.Sequential):
        stages = [quantizer_label(q) for q in quantizer]
        stages = [st for st in stages if st != UNQUANTIZED]
        return "+".join(stages) if stages else UNQUANTIZED
    if not getattr(quantizer, "is_enabled", False):
        return UNQUANTIZED
    return _label(quantizer.num_bits, getattr(quantizer, "block_sizes", None))


def format_weight_label(config: dict[str, Any]) -> str:
    """The label a format config's weight quantizer gets (same vocabulary as :func:`quantizer_label`)."""
    entries = [e for e in config.get("quant_cfg", []) if isinstance(e, dict)
               and str(e.get("quantizer_name", "")).endswith("weight_quantizer") and "parent_class" not in e]
    labels = []
    for entry in entries:  # every weight-quantizer setting must be nameable, path-scoped ones too
        cfg = entry.get("cfg") or {}
        stages = cfg if isinstance(cfg, list) else [cfg]
        labels.append("+".join(_label(st.get("num_bits", 8), st.get("block_sizes")) for st in stages
                               if isinstance(st, dict) and st.get("enable", True)) or UNQUANTIZED)
    return labels[-1] if labels else UNQUANTIZED


def check_formats_labelled(names: tuple[str, ...] | list[str]) -> None:
    """Refuse, before any search, a format whose quantizers the manifest could not name."""
    from auto_quantize_model.errors import UserError
    from auto_quantize_model.modelopt_configs import resolve_quant_config

    for name in names:
        try:
            format_weight_label(resolve_quant_config(name))
        except (ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"format {name} cannot be labelled in the manifest ({exc}); choose another format") from exc


def live_layer_formats(model: nn.Module) -> dict[str, dict[str, str]]:
    """Per Linear: the label of its weight and input quantizers as the model runs now."""
    out = {}
    for name, mod in linear_layers(model).items():
        out[name] = {
            "weight": quantizer_label(getattr(mod, "weight_quantizer", None)),
            "input": quantizer_label(getattr(mod, "input_quantizer", None)),
        }
    return out
