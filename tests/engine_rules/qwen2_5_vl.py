"""The module tree of Qwen2.5-VL that vLLM and SGLang build, from an export's config.json.

Both engines fuse the language model's q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``
(vLLM 0.34.0 ``models/qwen2.py`` ``Qwen2Attention``/``Qwen2MLP``; SGLang 0.5.23 ``models/qwen2.py``), keep the
vision tower's stored ``attn.qkv`` whole and fuse its gate/up (vLLM ``models/qwen2_5_vl.py``
``Qwen2_5_VisionAttention``/``Qwen2_5_VisionMLP``; SGLang ``Qwen2_5_VLMLP`` with ``fuse_gate_up``), and build the
patch embedding as a Conv3d without a quantization config (never FP8). Names here are the checkpoint's legacy
names (``model.layers.*``, ``visual.*``, ``lm_head``), which ``export_hf_checkpoint`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .view import ExportView, Linear


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int
    merge: int

    @classmethod
    def of(cls, view: ExportView) -> Dims:
        t, v = view.text_config, view.config.get("vision_config") or {}
        return cls(
            layers=t["num_hidden_layers"], hidden=t["hidden_size"], heads=t["num_attention_heads"],
            kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]), intermediate=t["intermediate_size"],
            vocab=t.get("vocab_size", view.config.get("vocab_size")), vision_depth=v.get("depth", 0),
            vision_hidden=v.get("hidden_size", 0), vision_intermediate=v.get("intermediate_size", 0),
            vision_out=v.get("out_hidden_size", 0), merge=v.get("spatial_merge_size", 2),
        )


def linears(dims: Dims) -> list[Linear]:
    """Every Linear either engine builds with the quantization config, in the checkpoint's names."""
    head_dim = dims.hidden // dims.heads
    q, kv = dims.heads * head_dim, dims.kv_heads * head_dim
    out = []
    for i in range(dims.layers):
        p = f"model.layers.{i}"
        out += [
            Linear(f"{p}.self_attn", "qkv_proj", (("q_proj", "q", q), ("k_proj", "k", kv), ("v_proj", "v", kv)),
                   dims.hidden, True, "language"),
            Linear(f"{p}.self_attn", "o_proj", (("o_proj", None, dims.hidden),), q, False, "language"),
            Linear(f"{p}.mlp", "gate_up_proj", (("gate_proj", 0, dims.intermediate), ("up_proj", 1, dims.intermediate)),
                   dims.hidden, False, "language"),
            Linear(f"{p}.mlp", "down_proj", (("down_proj", None, dims.hidden),), dims.intermediate, False, "language"),
        ]
    vh, vi = dims.vision_hidden, dims.vision_intermediate
    for j in range(dims.vision_depth):
        p = f"visual.blocks.{j}"
        out += [
            Linear(f"{p}.attn", "qkv", (("qkv", None, 3 * vh),), vh, True, "vision"),
            Linear(f"{p}.attn", "proj", (("proj", None, vh),), vh, True, "vision"),
            Linear(f"{p}.mlp", "gate_up_proj", (("gate_proj", 0, vi), ("up_proj", 1, vi)), vh, True, "vision"),
            Linear(f"{p}.mlp", "down_proj", (("down_proj", None, vh),), vi, True, "vision"),
        ]
    if dims.vision_depth:
        merged = vh * dims.merge**2
        out += [Linear("visual.merger.mlp", "0", (("0", None, merged),), merged, True, "vision"),
                Linear("visual.merger.mlp", "2", (("2", None, dims.vision_out),), merged, True, "vision")]
    out.append(Linear("", "lm_head", (("lm_head", None, dims.vocab),), dims.hidden, False, "head"))
    return out


def plain_params(dims: Dims) -> dict[str, tuple[int, ...] | None]:
    """Parameters outside the quantizable Linears (norms, embedding, patch Conv3d), with their shapes
    where the loader asserts them (None: not checked here)."""
    out: dict[str, tuple[int, ...] | None] = {"model.embed_tokens.weight": (dims.vocab, dims.hidden),
                                              "model.norm.weight": (dims.hidden,)}
    for i in range(dims.layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = (dims.hidden,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (dims.hidden,)
    if dims.vision_depth:
        out["visual.patch_embed.proj.weight"] = None
        out["visual.merger.ln_q.weight"] = (dims.vision_hidden,)
        for j in range(dims.vision_depth):
            out[f"visual.blocks.{j}.norm1.weight"] = (dims.vision_hidden,)
            out[f"visual.blocks.{j}.norm2.weight"] = (dims.vision_hidden,)
    return out


def tie_word_embeddings(view: ExportView) -> bool:
    """What transformers (>= 5.16, the floor of vLLM 0.34.0) reads: the top-level ``tie_word_embeddings``, or a
    ``text_config.tie_word_embeddings: true`` that pre-v5 saves left there and v5 forwards to the top level
    (transformers 5.16.1 ``models/qwen2_5_vl/configuration_qwen2_5_vl.py`` ``Qwen2_5_VLConfig.__post_init__``)."""
    text = view.config.get("text_config") or {}
    return bool(view.config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
