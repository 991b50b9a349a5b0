"""What each LM Linear is (block index, kind) and what the quantized model really runs it in.

The dtype of a layer is read from its live quantizers, never from the search result: a layer is FP8
when its weight quantizer is enabled with ``num_bits == (4, 3)``. A test cross-checks the two.
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
UNQUANTIZED = "bf16"


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


def quantizer_label(quantizer: Any) -> str:
    """A short name for what a TensorQuantizer does: fp8, nvfp4, mxfp8, int8, int4, ... or bf16 when off."""
    if quantizer is None or not getattr(quantizer, "is_enabled", False):
        return UNQUANTIZED
    bits = quantizer.num_bits
    block = getattr(quantizer, "block_sizes", None) or {}
    scale_bits = block.get("scale_bits") if isinstance(block, dict) else None
    if bits == (4, 3):
        return "mxfp8" if scale_bits == (8, 0) else "fp8"
    if bits == (2, 1):
        return "mxfp4" if scale_bits == (8, 0) else "nvfp4"
    if isinstance(bits, tuple):
        return f"fp{sum(bits) + 1}_e{bits[0]}m{bits[1]}"
    return f"int{bits}"


def live_layer_formats(model: nn.Module) -> dict[str, dict[str, str]]:
    """Per Linear: the label of its weight and input quantizers as the model runs now."""
    out = {}
    for name, mod in linear_layers(model).items():
        out[name] = {
            "weight": quantizer_label(getattr(mod, "weight_quantizer", None)),
            "input": quantizer_label(getattr(mod, "input_quantizer", None)),
        }
    return out
