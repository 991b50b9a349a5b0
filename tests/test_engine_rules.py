"""Unit tests of the engine rule sets on hand-made configs and tensor headers (fast; no model, no export).

The compressed-tensors rules (vLLM 0.34.0) are ready for the compressed-tensors export; until it exists they
run on hand-made configs in the form llm-compressor writes. The ModelOpt cases here cover what the tiny
model's real exports cannot show (a 12-layer model, ModelOpt's own wildcard summary, the nested config file).
"""

from __future__ import annotations

import pytest
from engine_rules import REFUSED, SILENT, TensorMeta, check_all, sglang_modelopt, vllm_compressed_tensors, vllm_modelopt
from engine_rules.synthetic import build, language_modules

FP8_ARGS = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}


def ct_config(ignore, targets=("Linear",), fmt="float-quantized", inputs=FP8_ARGS, **extra):
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": list(targets), "weights": FP8_ARGS, "input_activations": inputs}},
            "ignore": list(ignore), **extra}


def test_ct_lm_fp8_head_bf16_tied_loads():
    fp8 = language_modules()
    view = build(fp8, ct_config(["lm_head", "re:visual.*"]), tie=True, scale_shape=(1,))
    plan = vllm_compressed_tensors.check(view)
    assert plan.ok, plan.summary()
    assert plan.served_fp8() == fp8 and plan.lm_head_tied


def test_ct_fp8_head_needs_a_regex_target():
    """ParallelLMHead is not a ``Linear`` by class name, and the bare name ``lm_head`` is not renamed (no dot) so it
    never equals vLLM's ``language_model.lm_head``: only a regex target quantizes the head."""
    fp8 = language_modules() | {"lm_head"}
    ok = build(fp8, ct_config(["re:visual.*"], targets=("Linear", "re:.*lm_head$")), tie=False, scale_shape=(1,))
    plan = vllm_compressed_tensors.check(ok)
    assert plan.ok and "lm_head" in plan.served_fp8(), plan.summary()
    bad = build(fp8, ct_config(["re:visual.*"], targets=("Linear", "lm_head")), tie=False, scale_shape=(1,))
    assert {"fp8-into-bf16", "unexpected-tensor"} <= vllm_compressed_tensors.check(bad).rules()


def test_ct_globs_are_not_patterns():
    """compressed-tensors ignore entries are exact names or ``re:`` regexes (use_fnmatch=False): ModelOpt's
    ``visual*`` leaves the vision tower to the ``Linear`` target, which then expects FP8 weights there."""
    view = build(language_modules(), ct_config(["lm_head", "visual*"]), tie=True)
    plan = vllm_compressed_tensors.check(view)
    assert plan.rules() == {"bf16-into-fp8", "missing-scale"}
    assert all(f.subject.startswith("visual.") for f in plan.findings)


def test_ct_ignore_by_module_name_in_either_naming():
    """llm-compressor lists BF16 modules by name; transformers >= 4.52 names (model.language_model.*) are renamed."""
    fp8 = language_modules() - {"model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"}
    ignore = ["lm_head", "re:visual.*", "model.language_model.layers.1.mlp.down_proj",
              "model.layers.0.self_attn.o_proj"]
    plan = vllm_compressed_tensors.check(build(fp8, ct_config(ignore), tie=True))
    assert plan.ok and plan.served_fp8() == fp8, plan.summary()


def test_ct_one_shard_ignored_is_refused():
    fp8 = language_modules() - {"model.layers.0.self_attn.q_proj"}
    view = build(fp8, ct_config(["lm_head", "re:visual.*", "model.layers.0.self_attn.q_proj"]), tie=True)
    assert "fused-shard-mismatch" in vllm_compressed_tensors.check(view).rules()


@pytest.mark.parametrize("change", ["dynamic_input", "dense_format", "channel_weights"])
def test_ct_other_schemes_are_reported(change):
    inputs, fmt, weights = dict(FP8_ARGS), "float-quantized", dict(FP8_ARGS)
    if change == "dynamic_input":
        inputs["dynamic"] = True
    if change == "dense_format":
        fmt = "dense"
    cfg = ct_config(["lm_head", "re:visual.*"], fmt=fmt, inputs=inputs)
    if change == "channel_weights":
        cfg["config_groups"]["group_0"]["weights"] = {**weights, "strategy": "channel"}
    plan = vllm_compressed_tensors.check(build(language_modules(), cfg, tie=True))
    assert "unmodelled-scheme" in plan.rules()


def test_ct_attention_only_group_is_dropped():
    cfg = ct_config(["lm_head", "re:visual.*"])
    cfg["config_groups"]["group_1"] = {"targets": ["Qwen2_5_VLAttention"], "input_activations": FP8_ARGS}
    assert vllm_compressed_tensors.check(build(language_modules(), cfg, tie=True)).ok


def test_dispatch_by_quant_method():
    ct = build(language_modules(), ct_config(["lm_head", "re:visual.*"]), tie=True)
    assert [p.engine for p in check_all(ct)] == [vllm_compressed_tensors.ENGINE]
    mo = build(language_modules(), {"quant_method": "modelopt", "quant_algo": "FP8",
                                    "ignore": ["lm_head", "visual*", "model.embed_tokens"]}, tie=True)
    assert [p.engine for p in check_all(mo)] == [vllm_modelopt.ENGINE, sglang_modelopt.ENGINE]
    assert all(p.ok for p in check_all(mo))
    assert vllm_compressed_tensors.check(mo).rules() == {"quant-method"}


@pytest.mark.slow  # importing modelopt.torch.export takes ~20 s
def test_modelopt_wildcard_summary_on_a_deep_model():
    """On the 3B (36 layers) ``model.layers.1*`` would also cover layers 10-19. Exclusions made by ModelOpt's own
    summariser (quant_utils._prefix_wildcard_summarize_exclude_modules) for a 12-layer model with layer 1 all BF16
    and layers 10-11 FP8 must be served exactly so by both engines (vLLM's substring rule included)."""
    from modelopt.torch.export.quant_utils import _prefix_wildcard_summarize_exclude_modules

    every = language_modules(12)
    bf16 = {m for m in every if m.startswith("model.layers.1.")} | {"model.layers.10.mlp.down_proj"}
    fp8 = every - bf16
    excl = sorted(_prefix_wildcard_summarize_exclude_modules(sorted(bf16 | {"lm_head"}), sorted(fp8)))
    assert "model.layers.1.*" in excl  # not model.layers.1*, which would also match layers 10 and 11
    cfg = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": excl + ["visual*", "model.embed_tokens"]}
    view = build(fp8, cfg, tie=True, layers=12)
    for engine in (vllm_modelopt, sglang_modelopt):
        plan = engine.check(view)
        assert plan.ok and plan.served_fp8() == fp8, plan.summary()
    # The ambiguous spelling really is caught: both engines would then build layers 10 and 11 BF16.
    view.config["quantization_config"]["ignore"] = ["model.layers.1*" if e == "model.layers.1.*" else e for e in
                                                    view.config["quantization_config"]["ignore"]]
    for engine in (vllm_modelopt, sglang_modelopt):
        plan = engine.check(view)
        assert "fp8-into-bf16" in plan.rules() and "model.layers.10.mlp.gate_proj" not in plan.served_fp8()


def test_modelopt_nested_config_file_only():
    """Without quantization_config in config.json both engines read hf_quant_config.json's nested form."""
    fp8 = language_modules()
    hf = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                                                             "exclude_modules": ["lm_head", "visual*"]}}
    view = build(fp8, {}, tie=True, hf_quant_config=hf)
    del view.config["quantization_config"]
    for engine in (vllm_modelopt, sglang_modelopt):
        plan = engine.check(view)
        assert plan.ok and plan.served_fp8() == fp8, plan.summary()
    del view.hf_quant_config["quantization"]["exclude_modules"][1]
    assert {f.effect for f in vllm_modelopt.check(view).findings} == {SILENT}


def test_missing_config_is_refused():
    view = build(language_modules(), {}, tie=True)
    del view.config["quantization_config"]
    for engine in (vllm_modelopt, sglang_modelopt):
        assert [(f.rule, f.effect) for f in engine.check(view).findings] == [("no-quant-config", REFUSED)]


def _modelopt(ignore):
    return {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": list(ignore)}


def test_quantized_vision_tower_loads_through_the_vision_path():
    """A whole-VLM run that makes vision Linears FP8 (stored qkv whole, gate/up as shards, merger) is loadable when
    the vision tower is not excluded: both engines build those Linears FP8 from the stored scales."""
    vision = {"visual.blocks.0.attn.qkv", "visual.blocks.0.attn.proj", "visual.blocks.0.mlp.gate_proj",
              "visual.blocks.0.mlp.up_proj", "visual.blocks.0.mlp.down_proj", "visual.merger.mlp.0",
              "visual.merger.mlp.2"}
    fp8 = language_modules() | vision
    view = build(fp8, _modelopt(["lm_head", "model.embed_tokens"]), tie=True)
    for engine in (vllm_modelopt, sglang_modelopt):
        plan = engine.check(view)
        assert plan.ok and plan.served_fp8() == fp8, plan.summary()


def test_fp8_patch_embed_is_never_served():
    """The patch embedding is a Conv3d built without the quantization config in both engines: an FP8 copy of it
    (what a whole-VLM search may pick) is cast unscaled and its scales have nowhere to go."""
    view = build(language_modules(), _modelopt(["lm_head", "visual*", "model.embed_tokens"]), tie=True)
    view.tensors["visual.patch_embed.proj.weight"] = TensorMeta("F8_E4M3", (32, 3, 2, 14, 14))
    view.tensors["visual.patch_embed.proj.weight_scale"] = TensorMeta("F32", (), 0.01)
    assert vllm_modelopt.check(view).rules() == {"fp8-into-bf16", "unexpected-tensor"}
    assert sglang_modelopt.check(view).rules() == {"fp8-into-bf16", "ignored-tensor"}


def test_a_missing_plain_weight_is_caught():
    view = build(language_modules(), _modelopt(["lm_head", "visual*", "model.embed_tokens"]), tie=True)
    del view.tensors["model.layers.1.post_attention_layernorm.weight"]
    for engine in (vllm_modelopt, sglang_modelopt):
        assert [(f.rule, f.effect) for f in engine.check(view).findings] == [("missing-weight", SILENT)]
