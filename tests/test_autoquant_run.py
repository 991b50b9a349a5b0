"""AutoQuant runs on the tiny model: every scheme, manifest schema, dtype cross-check, score reuse."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_close

from auto_quantize_model.autoquant.manifest import REQUIRED_KEYS, SCHEMA_VERSION, load_manifest
from auto_quantize_model.autoquant.restore import apply_restore_artifact
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import AUTOQUANT_FP8_SCHEMES, get_scheme, resolve_scheme
from auto_quantize_model.errors import UserError

SEED_SCHEMES = ["fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full", "fp8_autoquant_all_layers_fp8"]


@pytest.fixture(scope="module")
def catalog_runs(loaded, calib, tmp_path_factory):
    """Every catalog scheme, run once into its own directory with one shared score cache."""
    root = tmp_path_factory.mktemp("catalog")
    return {
        name: run_scheme(loaded, calib, resolve_scheme(s), root / name, cache_dir=root / "cache")
        for name, s in AUTOQUANT_FP8_SCHEMES.items()
    }


@pytest.mark.parametrize("name", sorted(AUTOQUANT_FP8_SCHEMES))
def test_every_catalog_scheme_writes_valid_outputs(catalog_runs, name):
    r = catalog_runs[name]
    for path in (r.manifest_path, r.report_path, r.restore_path):
        assert path.is_file() and path.stat().st_size > 0
    m = load_manifest(r.manifest_path)
    assert m == r.manifest
    assert m["schema_version"] == SCHEMA_VERSION and set(REQUIRED_KEYS) <= set(m)
    assert m["scheme"]["name"] == name and m["budget_met"] is True
    assert m["effective_bits"]["achieved"] <= m["scheme"]["effective_bits"] + 1e-6
    assert m["effective_bits"]["measured"] == pytest.approx(m["effective_bits"]["achieved"])
    assert "# Layer sensitivity: " + name in r.report_path.read_text()
    # No temporary files left beside the outputs.
    assert not [p for p in r.manifest_path.parent.iterdir() if p.name.startswith(".")]


def test_manifest_describes_every_lm_linear(catalog_runs, loaded, calib):
    m = catalog_runs["fp8_autoquant_top50"].manifest
    layers = m["layers"]
    assert len(layers) == m["num_layers"] == 29
    assert layers["lm_head"]["kind"] == "lm_head" and layers["lm_head"]["block_index"] is None
    q = layers["model.layers.2.self_attn.q_proj"]
    assert (q["kind"], q["block_index"], q["search_group"]) == ("q", 2, "model.layers.2.self_attn.q_proj")
    assert layers["model.layers.2.self_attn.v_proj"]["search_group"] == "model.layers.2.self_attn.q_proj"
    assert layers["model.layers.1.mlp.up_proj"]["search_group"] == "model.layers.1.mlp.gate_proj"
    # Unquantized layers carry the run's dtype: this CPU run is float32, so "fp32", never "bf16".
    assert m["model"]["dtype"] == "float32"
    assert {lay["dtype"] for lay in layers.values()} == {"fp8", "fp32"}
    assert {lay["input_dtype"] for lay in layers.values()} == {"fp8", "fp32"}
    assert len(m["layer_sensitivity"]) == 4 * 4 + 1
    # lm_head is FP8_DEFAULT_CFG's own exclusion: kept out of the search (NONE alone) and out of the budget.
    assert m["layer_sensitivity"]["lm_head"]["candidate_formats"] == ["NONE"]
    assert m["layer_sensitivity"]["lm_head"]["cost_weight"] == 0.0
    for group, info in m["layer_sensitivity"].items():
        if group == "lm_head":
            continue
        assert info["candidate_formats"] == ["FP8_DEFAULT_CFG", "NONE"]
        assert info["scores"][0] > 0 and info["scores"][1] == 0
        assert info["costs"][0] == pytest.approx(info["costs"][1] / 2)
    st = m["autoquant_state"]
    assert {"candidate_stats", "best", "quantizer_states"} <= set(st["keys"])
    assert st["best"]["is_satisfied"] and len(st["best"]["recipe"]) == 17
    assert m["calibration"]["token_hash"] == calib.token_hash and m["calibration"]["num_samples"] == 24
    assert m["model"]["config_hash"] == loaded.config_hash
    assert m["model"]["parameter_counts"]["left_out"] > 0
    assert {"torch", "transformers", "nvidia-modelopt", "auto-quantize-model"} <= set(m["versions"])
    assert "git_revision" in m
    assert {"load", "calibrate", "score", "solve", "write_restore", "total"} <= set(m["timings"])


@pytest.mark.parametrize("name", SEED_SCHEMES)
def test_layer_dtypes_agree_with_search_result(catalog_runs, name):
    """Manifest dtypes come from live quantizers; they must match what the solver chose."""
    r = catalog_runs[name]
    best = r.search_state["best"]["recipe"]
    modules = dict(r.model.named_modules())
    for lname, lay in r.manifest["layers"].items():
        chosen = best[lay["search_group"] + ".quant_recipe"]
        solver_fp8 = not str(chosen).startswith("NONE")
        assert (lay["dtype"] == "fp8") == solver_fp8, lname
        wq = modules[lname].weight_quantizer
        assert wq.is_enabled == solver_fp8 and (not solver_fp8 or wq.num_bits == (4, 3))


def test_fp8_layer_count_grows_with_budget(catalog_runs):
    counts = [catalog_runs[n].manifest["num_quantized_layers"] for n in SEED_SCHEMES[:3]]
    assert counts[0] <= counts[1] <= counts[2] == 28  # every layer but the excluded lm_head
    assert counts[0] < counts[2]
    assert catalog_runs["fp8_autoquant_all_layers_fp8"].manifest["num_quantized_layers"] == 29


def test_search_leaves_loaded_model_pristine(catalog_runs, loaded, calib):
    from modelopt.torch.quantization.nn import TensorQuantizer

    assert not any(isinstance(m, TensorQuantizer) for m in loaded.model.modules())


@pytest.mark.slow
def test_second_run_with_other_bits_skips_calibration_and_scoring(loaded, calib, tmp_path, monkeypatch):
    calls = {"forward": 0}

    real = loaded.forward_step

    def counting_forward(model, batch):
        calls["forward"] += 1
        return real(model, batch)

    monkeypatch.setattr(loaded, "forward_step", counting_forward)
    scheme = resolve_scheme(get_scheme("fp8_autoquant_top25"))
    first = run_scheme(loaded, calib, scheme, tmp_path / "a", cache_dir=tmp_path / "cache")
    assert first.scored and calls["forward"] > 0 and first.manifest["score_cache"]["reused"] is False
    calls["forward"] = 0
    second = run_scheme(loaded, calib, dataclasses.replace(scheme, effective_bits=10.0), tmp_path / "b",
                        cache_dir=tmp_path / "cache")
    assert not second.scored and calls["forward"] == 0
    assert second.manifest["score_cache"] == {**first.manifest["score_cache"], "reused": True}
    assert second.manifest["timings"]["score"] == 0.0 and second.manifest["timings"]["calibrate"] == 0.0
    assert second.manifest["num_quantized_layers"] >= first.manifest["num_quantized_layers"]
    # Identical scores: they came from the same cache.
    g = "model.layers.1.self_attn.o_proj"
    assert second.manifest["layer_sensitivity"][g]["scores"] == first.manifest["layer_sensitivity"][g]["scores"]
    # A different method is a different key: it scores again.
    third = run_scheme(loaded, calib, dataclasses.replace(scheme, method="kl_div"), tmp_path / "c",
                       cache_dir=tmp_path / "cache")
    assert third.scored and third.manifest["score_cache"]["key"] != first.manifest["score_cache"]["key"]
    assert third.manifest["budget_met"]


def test_restore_artifact_rebuilds_the_quantized_model(catalog_runs, loaded, calib):
    import copy

    r = catalog_runs["fp8_autoquant_top50"]
    batch = calib.batches[0]
    with torch.no_grad():
        expected = loaded.forward_step(r.model, batch)
        rebuilt = apply_restore_artifact(copy.deepcopy(loaded.model), r.restore_path, loaded.describe(), r.manifest)
        got = loaded.forward_step(rebuilt, batch)
        bf16 = loaded.forward_step(loaded.model, batch)
    assert_close(got, expected)
    assert not torch.allclose(got, bf16)  # it really is quantized
    with pytest.raises(UserError, match="another checkpoint"):
        apply_restore_artifact(copy.deepcopy(loaded.model), r.restore_path, {**loaded.describe(), "config_hash": "0" * 64})
    with pytest.raises(UserError, match="other|weights"):
        apply_restore_artifact(copy.deepcopy(loaded.model), r.restore_path,
                               {**loaded.describe(), "weights_fingerprint": "0" * 64})


def test_infeasible_budget_is_a_user_error(loaded, calib, tmp_path):
    # With every MLP disabled, its weights still count in the denominator, so 8 bits is unreachable.
    scheme = dataclasses.replace(resolve_scheme(get_scheme("fp8_autoquant_full")), disabled_layers=("*mlp*",),
                                 cost_exclude_disabled=False)
    with pytest.raises(UserError, match="infeasible"):
        run_scheme(loaded, calib, scheme, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*_quant_manifest.json"))


@pytest.mark.slow
def test_in_memory_resolve_equals_fresh_resolve_and_leaves_no_trace(loaded, calib, tmp_path):
    import copy

    from auto_quantize_model.autoquant.run import resolve_budget

    scheme = resolve_scheme(get_scheme("fp8_autoquant_top25"))
    first = run_scheme(loaded, calib, scheme, tmp_path / "b14", cache_dir=tmp_path / "cache")
    batch = calib.batches[0]
    with torch.no_grad():
        at14 = loaded.forward_step(first.model, batch)
    low = dataclasses.replace(scheme, effective_bits=10.0)
    resolved = resolve_budget(first, loaded, calib, low, tmp_path / "b10")
    fresh = run_scheme(loaded, calib, low, tmp_path / "b10-fresh", cache_dir=tmp_path / "cache")
    assert not fresh.scored and resolved.manifest["score_cache"]["in_memory"] is True
    assert resolved.manifest["layers"] == fresh.manifest["layers"]
    assert resolved.manifest["autoquant_state"]["best"] == fresh.manifest["autoquant_state"]["best"]
    assert resolved.manifest["effective_bits"] == fresh.manifest["effective_bits"]
    with torch.no_grad():
        assert torch.equal(loaded.forward_step(resolved.model, batch), loaded.forward_step(fresh.model, batch))
        rebuilt = apply_restore_artifact(copy.deepcopy(loaded.model), resolved.restore_path, loaded.describe(),
                                         resolved.manifest)
        assert torch.equal(loaded.forward_step(rebuilt, batch), loaded.forward_step(fresh.model, batch))
    # Back to 14 bits: exactly the first result again, nothing of the 10-bit solution left.
    back = resolve_budget(resolved, loaded, calib, scheme, tmp_path / "b14-again")
    assert back.manifest["layers"] == first.manifest["layers"]
    with torch.no_grad():
        assert torch.equal(loaded.forward_step(back.model, batch), at14)
    with pytest.raises(ValueError, match="scoring key"):
        resolve_budget(back, loaded, calib, dataclasses.replace(scheme, method="kl_div"), tmp_path / "x")
