"""Hand-made export views (config + tensor headers, no weights) for unit tests of the rule sets.

The tensors are what ``export_hf_checkpoint`` (or a compressed-tensors save) writes for Qwen2.5-VL in legacy
names: per FP8 Linear shard ``weight`` F8_E4M3 plus ``weight_scale``/``input_scale``; BF16 elsewhere.
"""

from __future__ import annotations

from typing import Any

from .qwen2_5_vl import Dims, linears, plain_params
from .view import ExportView, TensorMeta

TEXT = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 176, "vocab_size": 549}
VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "spatial_merge_size": 2}


def build(fp8: set[str], quantization_config: dict[str, Any], *, tie: bool, layers: int = 2,
          scale_shape: tuple[int, ...] = (), hf_quant_config: dict[str, Any] | None = None) -> ExportView:
    """A view whose checkpoint modules in ``fp8`` (legacy names, e.g. ``model.layers.0.mlp.up_proj``,
    ``lm_head``) are stored FP8 with scales; ``lm_head.weight`` is stored unless ``tie``."""
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "tie_word_embeddings": tie, "text_config": {**TEXT, "num_hidden_layers": layers},
              "vision_config": dict(VISION), "quantization_config": quantization_config}
    view = ExportView(config, hf_quant_config, {})
    dims = Dims.of(view)
    for linear in linears(dims):
        if linear.tower == "head" and tie:
            continue
        for leaf, _, rows in linear.shards:
            src = linear.path(leaf)
            q = src in fp8
            view.tensors[f"{src}.weight"] = TensorMeta("F8_E4M3" if q else "BF16", (rows, linear.in_features))
            if linear.bias:
                view.tensors[f"{src}.bias"] = TensorMeta("BF16", (rows,))
            if q:
                view.tensors[f"{src}.weight_scale"] = TensorMeta("F32", scale_shape, 0.01)
                view.tensors[f"{src}.input_scale"] = TensorMeta("F32", scale_shape, 0.02)
    for name, shape in plain_params(dims).items():
        view.tensors[name] = TensorMeta("BF16", shape or (32, 3, 2, 14, 14))
    return view


def language_modules(layers: int = 2) -> set[str]:
    """Every quantizable checkpoint module of the language model (lm_head excluded)."""
    dims = Dims.of(ExportView({"text_config": {**TEXT, "num_hidden_layers": layers}, "vision_config": {}}, None, {}))
    return {s for lin in linears(dims) if lin.tower == "language" for s in lin.sources}
