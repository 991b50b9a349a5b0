"""Schemes that mean what they say: format exclusions, cost exclusion, ModelOpt recipes, no duplicate trials."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.configs.exclusions import format_exclusions, matching_pattern
from auto_quantize_model.errors import UserError

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "examples" / "recipes" / "int4w_fp8_lm_at_10bits.yaml"


@pytest.fixture(scope="module")
def pair_runs(loaded, calib, tmp_path_factory):
    """Default-exclusion FP8 and all-layers FP8 at the same budgets, one shared score cache."""
    root = tmp_path_factory.mktemp("pair")
    out = {}
    for name in ("fp8_autoquant_full", "fp8_autoquant_all_layers_fp8"):
        for bits in (10.0, 8.0):
            s = resolve_scheme(get_scheme(name), effective_bits=bits)
            out[name, bits] = run_scheme(loaded, calib, s, root / f"{name}-{bits:g}", cache_dir=root / "cache").manifest
    return out


def test_format_exclusions_come_from_the_installed_modelopt():
    import modelopt.torch.quantization as mtq

    pats = {e.pattern: e.source for e in format_exclusions(["FP8_DEFAULT_CFG"])}
    names = {e["quantizer_name"] for e in mtq.FP8_DEFAULT_CFG["quant_cfg"] if e.get("enable") is False
             and not e.get("parent_class") and e["quantizer_name"] != "*"}
    assert names <= set(pats) and pats["*lm_head*"] == "FP8_DEFAULT_CFG"
    assert format_exclusions(["FP8_ALL_LAYERS_CFG"]) == []
    # '*mlp.gate.*' addresses the gate's quantizers; as a module glob it must catch the gate, not gate_proj.
    ex = format_exclusions(["FP8_DEFAULT_CFG"])
    assert matching_pattern("model.layers.0.mlp.gate", ex) is not None
    assert matching_pattern("model.layers.0.mlp.gate_proj", ex) is None
    assert matching_pattern("lm_head", ex).pattern == "*lm_head*"
    setup = get_scheme("fp8_autoquant_top50").search_setup()
    assert "*lm_head*" in setup.disabled_layers and "*lm_head*" in setup.cost_excluded_layers
    # The all-layers format excludes nothing itself; only what the export cannot write (the patch embedding) is left
    # out of every search, and (cost_exclude_disabled) out of its budget.
    assert get_scheme("fp8_autoquant_all_layers_fp8").search_constraints() == {
        "effective_bits": 8.0, "cost": {"excluded_module_name_patterns": ["*patch_embed*"]}}


@pytest.mark.parametrize("bits", [10.0, 8.0])
def test_default_fp8_never_quantizes_lm_head_all_layers_searches_it(pair_runs, bits):
    d, a = pair_runs["fp8_autoquant_full", bits], pair_runs["fp8_autoquant_all_layers_fp8", bits]
    # Default exclusions: lm_head stays BF16, is not searched, not budgeted, and the manifest says why.
    assert d["layers"]["lm_head"]["dtype"] == "fp32" and d["layers"]["lm_head"]["excluded_by"] == "*lm_head*"
    assert d["layer_sensitivity"]["lm_head"]["candidate_formats"] == ["NONE"]
    assert d["exclusions"]["layers"]["lm_head"]["search"] == {"pattern": "*lm_head*", "source": "FP8_DEFAULT_CFG"}
    assert d["layers"]["lm_head"]["in_budget"] is False and d["budget_met"]
    assert d["effective_bits"]["measured"] == pytest.approx(d["effective_bits"]["achieved"])
    assert d["effective_bits"]["measured_all_layers"] > d["effective_bits"]["measured"]
    # All layers: lm_head is a candidate with a real score, counted in the budget.
    g = a["layer_sensitivity"]["lm_head"]
    assert g["candidate_formats"] == ["FP8_ALL_LAYERS_CFG", "NONE"] and g["scores"][0] > 0
    assert a["exclusions"]["layers"] == {} and a["layers"]["lm_head"]["in_budget"] is True
    # Different experiments: different choices and different total scores at the same budget.
    assert d["autoquant_state"]["best"]["recipe"] != a["autoquant_state"]["best"]["recipe"]
    assert d["autoquant_state"]["best"]["score"] != a["autoquant_state"]["best"]["score"]


def test_budget_covers_only_searched_layers(pair_runs):
    d, a = pair_runs["fp8_autoquant_full", 8.0], pair_runs["fp8_autoquant_all_layers_fp8", 8.0]
    # 8 bits = every *searched* layer FP8; lm_head (outside the budget) stays BF16.
    assert d["num_quantized_layers"] == d["num_layers"] - 1 == 28
    assert d["effective_bits"]["achieved"] == pytest.approx(8.0)
    assert a["num_quantized_layers"] == 29 and a["layers"]["lm_head"]["dtype"] == "fp8"
    assert "cost-excluded" in d["effective_bits"]["counted_over"]


def test_report_lists_excluded_layers_with_their_pattern(pair_runs, tmp_path):
    from auto_quantize_model.autoquant.report import render_report

    text = render_report(pair_runs["fp8_autoquant_full", 10.0])
    assert "## Excluded layers" in text and "| `lm_head` | `*lm_head*` (FP8_DEFAULT_CFG) |" in text
    assert "None: every searchable layer" in render_report(pair_runs["fp8_autoquant_all_layers_fp8", 10.0])


def test_builtin_recipe_is_a_scheme():
    s = get_scheme("general/auto_quantize/nvfp4_fp8_at_5p4bits")
    assert dataclasses.replace(get_scheme("nvfp4_fp8_at_5p4bits"), recipe=s.recipe) == s  # bare name works too
    assert s.name == "nvfp4_fp8_at_5p4bits" and s.quantization_formats == ("NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    assert (s.effective_bits, s.method, s.score_size, s.score_steps(4)) == (5.4, "gradient", 128, 32)
    assert "*router*" in s.disabled_layers and "*visual*" in s.cost_excluded_layers
    assert s.search_constraints()["cost"]["excluded_module_name_patterns"] == list(s.cost_excluded_layers)
    assert resolve_scheme(s, num_score_steps=8).score_steps(4) == 8  # explicit steps win over score_size


@pytest.mark.parametrize("body, match", [
    ("effective_bits: 20.0", "effective_bits must be in (0, 16]"),
    ("effective_bits: 8.0\n  bogus_field: 1", "bogus_field"),
])
def test_invalid_recipe_is_one_line_with_modelopts_message(tmp_path, body, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("effective_bits: 10.0", body))
    with pytest.raises(UserError) as exc:
        get_scheme(str(bad))
    assert match in str(exc.value) and "\n" not in str(exc.value)


def test_ptq_recipe_is_refused():
    with pytest.raises(UserError, match="is a ptq recipe"):
        get_scheme("general/ptq/fp8_default-kv_fp8")


def test_toml_schemes_use_recipe_field_names(tmp_path):
    from auto_quantize_model.configs import load_schemes_file

    f = tmp_path / "s.toml"
    f.write_text('[schemes.mix]\ncandidate_formats = ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG"]\n'
                 'constraints = {effective_bits = 6.0}\nauto_quantize_method = "kl_div"\nscore_size = 16\n'
                 'disabled_layers = ["*layers.0.*"]\ncost_excluded_layers = ["*layers.1.*"]\nformat_exclusions = false\n'
                 '[schemes.old]\nquantization_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = 12.0\nmethod = "gradient"\n')
    s = load_schemes_file(f)
    mix = s["mix"]
    assert (mix.quantization_formats, mix.effective_bits, mix.method, mix.score_size) == (
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG"), 6.0, "kl_div", 16)
    setup = mix.search_setup()
    # Plus what no search offers because the export cannot write it (every scheme; configs/exclusions.py).
    assert setup.disabled_layers == ["*layers.0.*", "*patch_embed*"]
    assert setup.cost_excluded_layers == ["*layers.1.*", "*layers.0.*", "*patch_embed*"]
    assert "*lm_head*" in s["old"].search_setup().disabled_layers  # format exclusions are on by default
    f.write_text('[schemes.x]\ncandidate_formats = ["FP8_DEFAULT_CFG"]\nquantization_formats = ["FP8_DEFAULT_CFG"]\n'
                 'effective_bits = 12.0\n')
    with pytest.raises(UserError, match="alias"):
        load_schemes_file(f)


def test_grid_merges_identical_experiments(tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.spec import expand_grid, load_sweep_spec

    spec = load_sweep_spec(None, {"name": "g", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path),
                                  "schemes": ("fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full",
                                              "fp8_autoquant_all_layers_fp8", str(RECIPE)),
                                  "effective_bits": (14.0, 10.0)})
    trials = expand_grid(spec)
    assert len(trials) == 3 * 2 and len({t.experiment_key for t in trials}) == 6
    fp8 = [t for t in trials if t.scheme == "fp8_autoquant_top25"]
    assert [t.equivalent_schemes for t in fp8] == [("fp8_autoquant_top50", "fp8_autoquant_full")] * 2
    rec = [t for t in trials if t.scheme == "int4w_fp8_lm_at_10bits"]
    assert len(rec) == 2 and all(t.scheme_ref == str(RECIPE) and "/" not in t.trial_id for t in rec)
    # Each scheme's own default budget: top25/top50/full differ, so nothing merges.
    own = expand_grid(load_sweep_spec(None, {"name": "g", "model_dir": str(tiny_model_dir),
                                             "schemes": ("fp8_autoquant_top25", "fp8_autoquant_top50")}))
    assert len(own) == 2 and not any(t.equivalent_schemes for t in own)


@pytest.mark.slow
def test_recipe_runs_through_autoquant_run(tiny_model_dir, tmp_path, capsys):
    from auto_quantize_model.cli import main

    out = tmp_path / "run"
    args = ["run", "--scheme-name", str(RECIPE), "--model-dir", str(tiny_model_dir), "--output-dir", str(out),
            "--captions-path", "demo", "--max-calib-samples", "8", "--batch-size", "4", "--calib-seq-len", "32",
            "--device", "cpu"]
    assert main(args) == 0
    m = json.loads((out / "int4w_fp8_lm_at_10bits_quant_manifest.json").read_text())
    assert m["scheme"]["recipe"] == str(RECIPE) and m["scheme"]["score_size"] == 32
    assert m["layers"]["lm_head"]["dtype"] == "fp32" and m["exclusions"]["layers"]["lm_head"]["search"]["source"] == "scheme"
    assert m["budget_met"] and m["effective_bits"]["target"] == 10.0


def test_invalid_recipe_on_the_cli_is_one_line_exit_2(tmp_path, capsys):
    from auto_quantize_model.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("auto_quantize_method: gradient", "auto_quantize_method: fisher"))
    out = tmp_path / "out"
    # The scheme is resolved before anything else is read, so no checkpoint is needed to see the error.
    assert main(["run", "--scheme-name", str(bad), "--model-dir", str(tmp_path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoquant: error: recipe") and "auto_quantize_method" in err[0], err
    assert "Traceback" not in err[0] and not (out.exists() and any(out.iterdir()))


@pytest.mark.timeout(420)
def test_sweep_runs_a_recipe_and_reports_merged_schemes_once(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.analysis import load_trials
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import load_sweep_spec

    spec = load_sweep_spec(None, {
        "name": "rec", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path / "sweeps"),
        "captions_path": "demo", "max_calib_samples": 16, "batch_size": 4, "calib_seq_len": 32,
        "schemes": (str(RECIPE), "fp8_autoquant_top25", "fp8_autoquant_top50"), "effective_bits": (12.0,),
        "num_workers": 1, "worker": {"num_gpus": 0, "num_cpus": 1},
    })
    res = run_sweep(spec)
    rows = res["rows"]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert "| fp8_autoquant_top25 = fp8_autoquant_top50 |" in res["summary"]
    trials = load_trials(res["tables"])
    assert sorted(trials["equivalent_schemes"].fillna("")) == ["", "fp8_autoquant_top50"]
    rec = next(r for r in rows if r["scheme"] == "int4w_fp8_lm_at_10bits")
    m = json.loads((Path(rec["trial_dir"]) / "int4w_fp8_lm_at_10bits_quant_manifest.json").read_text())
    assert m["scheme"]["recipe"] == str(RECIPE) and m["budget_met"]
