"""Engine conformance: real exports of the tiny model checked against vLLM 0.34.0's and SGLang 0.5.23's
ModelOpt loader rules and vLLM 0.34.0's compressed-tensors rules (tests/engine_rules; each module names the engine
files and functions it follows).

Three runs: LM-only FP8 with lm_head BF16 and tied, every layer FP8 with an FP8 (untied) lm_head, and a mixed run
whose BF16 blocks are excluded (ModelOpt's wildcards; exact names in compressed-tensors), each exported in both
formats; the all-layers run also with an FP8 KV cache in both formats, and an all-layers run with separate fused
scales. Each must load with the manifest's FP8 layers served FP8 and no other, and (shared fused scales, the
default) with no module requantized. Then tampered copies prove every rule fires.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from engine_rules import (
    IGNORED,
    REFUSED,
    SILENT,
    ExportView,
    TensorMeta,
    check_all,
    sglang_modelopt,
    vllm_compressed_tensors,
    vllm_modelopt,
)

from auto_quantize_model.autoquant.rebuild import find_run
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.export.hf import export_run

ENGINES = {"vllm": vllm_modelopt, "sglang": sglang_modelopt}
CT = "compressed-tensors"
SCHEMES = {  # run: (scheme, effective bits, fused scales)
    "lm_only": ("fp8_autoquant_full", 8.0, "shared"),
    "all_layers": ("fp8_autoquant_all_layers_fp8", 8.0, "shared"),
    "mixed": ("fp8_autoquant_full", 12.0, "shared"),
    "separate": ("fp8_autoquant_all_layers_fp8", 8.0, "separate"),
}
EXPORTS = {  # label: (run, format, kv cache)
    "lm_only": ("lm_only", "modelopt", "none"),
    "all_layers": ("all_layers", "modelopt", "none"),
    "mixed": ("mixed", "modelopt", "none"),
    "lm_only_ct": ("lm_only", CT, "none"),
    "all_layers_ct": ("all_layers", CT, "none"),
    "mixed_ct": ("mixed", CT, "none"),
    "all_layers_kv": ("all_layers", "modelopt", "fp8"),
    "all_layers_ct_kv": ("all_layers", CT, "fp8"),
    "separate": ("separate", "modelopt", "none"),
    "separate_ct": ("separate", CT, "none"),
}
RUNS = ("lm_only", "all_layers", "mixed")  # the ModelOpt-format exports of the three cases, both engines' rules
DEFAULT_SCALES = sorted(k for k, (run, _, _) in EXPORTS.items() if run != "separate")


@pytest.fixture(scope="module")
def conformance_exports(loaded, calib, tiny_model_dir, tmp_path_factory):
    """label -> (manifest, export dir) for every export (random-weight tiny model, CPU)."""
    root = tmp_path_factory.mktemp("conformance")
    for run, (base, bits, fused) in SCHEMES.items():
        scheme = dataclasses.replace(resolve_scheme(get_scheme(base)), name=f"conf_{run}", effective_bits=bits,
                                     fused_scales=fused)
        run_scheme(loaded, calib, scheme, root / run, cache_dir=root / "cache")
    out = {}
    for label, (run, fmt, kv) in EXPORTS.items():
        export_run(root / run, tiny_model_dir, root / f"export_{label}", format=fmt, kv_cache=kv)
        out[label] = (find_run(root / run).manifest, root / f"export_{label}")
    return out


@pytest.fixture(scope="module")
def views(conformance_exports):
    return {label: ExportView.read(d) for label, (_, d) in conformance_exports.items()}


def _fp8_layers(manifest) -> set[str]:
    return {name for name, layer in manifest["layers"].items() if layer["dtype"] == "fp8"}


def _ignore(view: ExportView) -> list[str]:
    return view.config["quantization_config"]["ignore"]


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("label", sorted(RUNS))
def test_exports_load_and_serve_the_manifest(conformance_exports, views, label, engine):
    manifest, _ = conformance_exports[label]
    plan = ENGINES[engine].check(views[label])
    assert plan.ok, plan.summary()
    # What the engine runs in FP8 is exactly what the run chose: nothing more (vision, embedding), nothing less.
    assert plan.served_fp8() == _fp8_layers(manifest)
    assert plan.lm_head_tied is (manifest["layers"]["lm_head"]["dtype"] != "fp8")
    assert not any(m.quantized for n, m in plan.modules.items() if "visual" in n)


def test_the_three_exports_cover_the_cases(conformance_exports, views):
    """The fixtures really are the three cases: a tied BF16 head, an untied FP8 head, BF16 blocks by wildcard."""
    assert views["lm_only"].config["tie_word_embeddings"] and "lm_head.weight" not in views["lm_only"].tensors
    assert views["all_layers"].tensors["lm_head.weight"].dtype == "F8_E4M3"
    assert not views["all_layers"].config["tie_word_embeddings"]
    mixed = _fp8_layers(conformance_exports["mixed"][0])
    assert 0 < len(mixed) < len(conformance_exports["mixed"][0]["layers"]) - 1
    assert any(e.endswith("*") and e != "visual*" for e in _ignore(views["mixed"]))


def _first_fp8(view: ExportView, suffix: str) -> str:
    return next(n for n, m in sorted(view.tensors.items()) if n.endswith(suffix) and m.dtype == "F8_E4M3")


def _tamper_drop_input_scale(v):
    del v.tensors[_first_fp8(v, "k_proj.weight").replace(".weight", ".input_scale")]


def _tamper_one_shard_excluded(v):
    _ignore(v).append(_first_fp8(v, "q_proj.weight").removesuffix(".weight"))


def _tamper_vision_misspelled(v):
    v.config["quantization_config"]["ignore"] = ["*.visual.*" if e == "visual*" else e for e in _ignore(v)]


def _tamper_vision_not_excluded(v):  # what the exporter wrote before it excluded the vision tower itself
    v.config["quantization_config"]["ignore"] = [e for e in _ignore(v) if e != "visual*"]


def _tamper_unexpected_tensor(v):
    v.tensors["model.layers.0.self_attn.q_proj.pre_quant_scale"] = TensorMeta("BF16", (64,))


def _tamper_scale_shape(v):
    name = _first_fp8(v, "down_proj.weight").replace(".weight", ".weight_scale")
    v.tensors[name] = dataclasses.replace(v.tensors[name], shape=(2,))


def _tamper_bf16_weight_for_fp8_layer(v):
    name = _first_fp8(v, "o_proj.weight")
    v.tensors[name] = dataclasses.replace(v.tensors[name], dtype="BF16")


def _tamper_fp8_layer_excluded(v):
    _ignore(v).append(_first_fp8(v, "down_proj.weight").removesuffix(".weight"))


# (tamper, rule both engines report, its effect). Run on the all-layers export.
BOTH = {
    "drop_input_scale": (_tamper_drop_input_scale, "missing-scale", SILENT),
    "one_shard_excluded": (_tamper_one_shard_excluded, "fused-shard-mismatch", REFUSED),
    "vision_misspelled": (_tamper_vision_misspelled, "bf16-into-fp8", SILENT),
    "vision_not_excluded": (_tamper_vision_not_excluded, "bf16-into-fp8", SILENT),
    "scale_shape": (_tamper_scale_shape, "scale-shape", REFUSED),
    "bf16_weight_for_fp8_layer": (_tamper_bf16_weight_for_fp8_layer, "bf16-into-fp8", SILENT),
    "fp8_layer_excluded": (_tamper_fp8_layer_excluded, "fp8-into-bf16", SILENT),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("case", sorted(BOTH))
def test_tampered_export_is_caught(views, case, engine):
    tamper, rule, effect = BOTH[case]
    v = views["all_layers"].copy()
    tamper(v)
    plan = ENGINES[engine].check(v)
    assert rule in plan.rules(), plan.summary()
    assert any(f.rule == rule and f.effect == effect for f in plan.findings)


def test_unexpected_tensor_refused_by_vllm_and_sglang(views):
    v = views["all_layers"].copy()
    _tamper_unexpected_tensor(v)
    for engine in ENGINES.values():  # a stacked (q_proj) name: vLLM's AutoWeightsLoader and SGLang's KeyError
        assert {(f.rule, f.effect) for f in engine.check(v).findings} == {("unexpected-tensor", REFUSED)}
    v = views["all_layers"].copy()
    v.tensors["model.layers.0.mlp.down_proj.pre_quant_scale"] = TensorMeta("BF16", (176,))
    assert vllm_modelopt.check(v).rules() == {"unexpected-tensor"}
    sg = sglang_modelopt.check(v)  # SGLang skips unknown non-stacked names without a word
    assert [(f.rule, f.effect) for f in sg.findings] == [("ignored-tensor", IGNORED)]


def test_tied_fp8_lm_head(views):
    """FP8 lm_head left tied: SGLang serves the BF16 embedding as the head (and copies the FP8 codes into it);
    vLLM 0.34.0 builds the head untied because the checkpoint stores lm_head.weight (PR #51665)."""
    v = views["all_layers"].copy()
    v.config["tie_word_embeddings"] = True
    assert "tied-lm-head-dropped" in sglang_modelopt.check(v).rules()
    plan = vllm_modelopt.check(v)
    assert plan.ok and not plan.lm_head_tied and "lm_head" in plan.served_fp8()


def test_tied_bf16_lm_head_must_be_excluded(views):
    """A tied (BF16) head that the exclusions forget: vLLM builds it FP8 and ties the BF16 embedding into it."""
    v = views["lm_only"].copy()
    v.config["quantization_config"]["ignore"] = [e for e in _ignore(v) if e != "lm_head"]
    assert vllm_modelopt.check(v).rules() == {"tied-lm-head-quantized"}
    assert sglang_modelopt.check(v).ok  # SGLang's tied head is the embedding, never quantized


def test_engines_differ_on_config_spellings(views):
    """Where the engines' rules differ, each rule set follows its engine."""
    v = views["all_layers"].copy()  # "model.visual*": vLLM's rename maps it to visual.*, SGLang's regex misses
    v.config["quantization_config"]["ignore"] = ["model.visual*" if e == "visual*" else e for e in _ignore(v)]
    assert vllm_modelopt.check(v).ok
    assert "bf16-into-fp8" in sglang_modelopt.check(v).rules()
    v = views["all_layers"].copy()  # exclusions under exclude_modules: vLLM falls back to it, SGLang reads ignore
    qc = v.config["quantization_config"]
    qc["exclude_modules"] = qc.pop("ignore")
    assert vllm_modelopt.check(v).ok
    assert "bf16-into-fp8" in sglang_modelopt.check(v).rules()
    v = views["all_layers"].copy()  # lower-case quant_algo: vLLM upper-cases it, SGLang wants exactly "FP8"
    v.config["quantization_config"]["quant_algo"] = "fp8"
    assert vllm_modelopt.check(v).ok
    assert sglang_modelopt.check(v).rules() == {"quant-algo"}


def test_fp8_kv_cache_scales(views):
    """ModelOpt names KV-cache scales self_attn.{k,v}_proj.{k,v}_scale: vLLM remaps them onto the attention
    layer (get_cache_scale_mapper); SGLang 0.5.23's Qwen2.5-VL loader has no remap, and the stacked k_proj/v_proj
    rename sends them to a qkv_proj parameter that does not exist (KeyError)."""
    v = views["all_layers"].copy()
    v.config["quantization_config"]["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    assert vllm_modelopt.check(v).rules() == {"missing-kv-scale"}
    for i in range(v.config["text_config"]["num_hidden_layers"]):
        for s in "kv":
            v.tensors[f"model.layers.{i}.self_attn.{s}_proj.{s}_scale"] = TensorMeta("F32", (), 0.05)
    plan = vllm_modelopt.check(v)
    assert plan.ok and plan.kv_cache_fp8
    assert sglang_modelopt.check(v).rules() == {"unexpected-tensor"}


def test_reader_reads_the_files(conformance_exports, tmp_path):
    """The view comes from the real files: header dtypes/shapes and scalar values equal safetensors' own load,
    and a tensor removed from the file is reported."""
    import torch
    from safetensors.torch import load_file, save_file

    _, src = conformance_exports["all_layers"]
    tensors = load_file(str(src / "model.safetensors"))
    view = ExportView.read(src)
    assert set(view.tensors) == set(tensors)
    for name, t in tensors.items():
        assert view.tensors[name].shape == tuple(t.shape)
        if t.numel() == 1 and t.dtype == torch.float32:
            assert view.tensors[name].value == t.item()
    dst = tmp_path / "tampered"
    shutil.copytree(src, dst)
    victim = next(n for n in sorted(tensors) if n.endswith("up_proj.input_scale"))
    save_file({k: t for k, t in tensors.items() if k != victim}, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    plan = vllm_modelopt.check(ExportView.read(dst))
    assert [(f.rule, f.subject) for f in plan.findings] == [("missing-scale", victim)]


def test_requantized_when_shard_scales_differ(views):
    """Fused shards with different scales are served requantized to the largest (vLLM KFp8StaticTensor.process,
    SGLang process_weights_after_loading); equal scales are served as stored."""
    v = views["all_layers"].copy()
    group = [f"model.layers.0.mlp.{p}_proj.{s}" for p in ("gate", "up") for s in ("weight_scale", "input_scale")]
    for name, value in zip(group, (0.01, 0.01, 0.02, 0.02)):
        v.tensors[name] = TensorMeta("F32", (), value)
    for engine in ENGINES.values():
        plan = engine.check(v)
        assert next(m for n, m in plan.modules.items() if n.endswith("layers.0.mlp.gate_up_proj")).requantized
    for name in group:
        v.tensors[name] = TensorMeta("F32", (), 0.02)
    for engine in ENGINES.values():
        plan = engine.check(v)
        assert not next(m for n, m in plan.modules.items() if n.endswith("layers.0.mlp.gate_up_proj")).requantized


# --- both formats, FP8 KV cache, fused scales (check_all picks the rule sets by quant_method) -------------------


@pytest.mark.parametrize("label", sorted(set(EXPORTS) - {"all_layers_kv"}))
def test_every_export_loads_with_the_manifests_layers(conformance_exports, views, label):
    """check_all: both ModelOpt rule sets, or vLLM's compressed-tensors rules, by the export's quant_method."""
    manifest, _ = conformance_exports[label]
    plans = check_all(views[label])
    assert [p.engine for p in plans] == (["vLLM 0.34.0 (compressed-tensors)"] if EXPORTS[label][1] == CT
                                         else ["vLLM 0.34.0", "SGLang 0.5.23"])
    for plan in plans:
        assert plan.ok, plan.summary()
        assert plan.served_fp8() == _fp8_layers(manifest)
        assert plan.lm_head_tied is (manifest["layers"]["lm_head"]["dtype"] != "fp8")
        assert not any(m.quantized for n, m in plan.modules.items() if "visual" in n)
        assert plan.kv_cache_fp8 is (EXPORTS[label][2] == "fp8")


def test_fp8_kv_cache_exports(views):
    """An FP8 KV cache with calibrated scales: vLLM loads both formats' names (ModelOpt's
    ``k_proj.k_scale`` remapped, compressed-tensors' ``self_attn.k_scale``); SGLang 0.5.23 refuses ModelOpt's names
    for Qwen2.5-VL (the export warns and its README_LOADING.md says so)."""
    for label in ("all_layers_kv", "all_layers_ct_kv"):
        vllm = check_all(views[label])[0]
        assert vllm.ok and vllm.kv_cache_fp8, vllm.summary()
    sg = sglang_modelopt.check(views["all_layers_kv"])
    assert sg.rules() == {"unexpected-tensor"} and all(f.subject.endswith(("k_proj.k_scale", "v_proj.v_scale"))
                                                      for f in sg.findings)


@pytest.mark.parametrize("label", DEFAULT_SCALES)
def test_default_exports_are_served_as_stored(views, label):
    """Shared fused scales (the default): no engine requantizes any module (one weight and input scale per fused
    group already)."""
    plans = check_all(views[label])
    fused = [m for p in plans for m in p.modules.values() if m.quantized and len(m.sources) > 1]
    assert fused and not any(m.requantized for m in fused)


@pytest.mark.parametrize("label", ["separate", "separate_ct"])
def test_separate_scales_exports_are_requantized(views, label):
    for plan in check_all(views[label]):
        assert plan.ok and any(m.requantized for m in plan.modules.values()), plan.engine


def _ct(v: ExportView) -> dict:
    return v.config["quantization_config"]


def _ct_vision_glob(v):  # ModelOpt's spelling in a compressed-tensors config: vLLM matches no globs
    _ct(v)["ignore"] = ["visual*" if e.startswith("re:") else e for e in _ct(v)["ignore"]]


def _ct_head_target_dropped(v):  # "Linear" does not match vLLM's ParallelLMHead
    group = next(iter(_ct(v)["config_groups"].values()))
    group["targets"] = [t for t in group["targets"] if t != "re:.*lm_head$"]


def _ct_one_shard_ignored(v):
    _ct(v)["ignore"].append("model.language_model.layers.1.self_attn.k_proj")


def _ct_drop_input_scale(v):
    del v.tensors[_first_fp8(v, "o_proj.weight").replace(".weight", ".input_scale")]


def _ct_dynamic_activations(v):
    next(iter(_ct(v)["config_groups"].values()))["input_activations"]["dynamic"] = True


def _ct_not_compressed_tensors(v):
    _ct(v)["quant_method"] = "llmc"


def _ct_layer_ignored(v):  # an FP8 layer spelled into ignore: served BF16 from FP8 codes
    _ct(v)["ignore"].append("model.language_model.layers.2.mlp.down_proj")


# (tamper, rule, effect). Run on the all-layers compressed-tensors export.
CT_TAMPER = {
    "vision_glob": (_ct_vision_glob, "bf16-into-fp8", SILENT),
    "head_target_dropped": (_ct_head_target_dropped, "fp8-into-bf16", SILENT),
    "one_shard_ignored": (_ct_one_shard_ignored, "fused-shard-mismatch", REFUSED),
    "drop_input_scale": (_ct_drop_input_scale, "missing-scale", SILENT),
    "dynamic_activations": (_ct_dynamic_activations, "unmodelled-scheme", REFUSED),
    "not_compressed_tensors": (_ct_not_compressed_tensors, "quant-method", REFUSED),
    "layer_ignored": (_ct_layer_ignored, "fp8-into-bf16", SILENT),
}


@pytest.mark.parametrize("case", sorted(CT_TAMPER))
def test_tampered_compressed_tensors_export_is_caught(views, case):
    tamper, rule, effect = CT_TAMPER[case]
    v = views["all_layers_ct"].copy()
    tamper(v)
    plan = vllm_compressed_tensors.check(v)
    assert any(f.rule == rule and f.effect == effect for f in plan.findings), plan.summary()


def test_compressed_tensors_names_match_in_vllm_not_by_checkpoint_spelling(views):
    """The export's ignore entries use transformers' runtime names, which vLLM's rename maps; its vision regex
    matches vLLM's ``visual.`` names. The rules see the lm_head regex and class target as the export intends."""
    v = views["mixed_ct"]
    plan = vllm_compressed_tensors.check(v)
    assert plan.ok
    assert all(e.startswith(("re:", "language_model.")) or e == "lm_head" for e in plan.exclusions), plan.exclusions
