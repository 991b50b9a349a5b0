"""Parquet tables from tiny-model manifests, pandas readers, and `autoquant analyze`."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow.parquet as pq
import pytest

from auto_quantize_model.analysis import load_layers, load_trials
from auto_quantize_model.analysis.aggregate import aggregate
from auto_quantize_model.analysis.report import analyze
from auto_quantize_model.analysis.summaries import (
    flip_budgets,
    inclusion_curve,
    independent_scorings,
    pareto_front,
    rank_agreement,
)
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.cli import main
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.errors import UserError
from auto_quantize_model.records.tables import LAYERS_SCHEMA, TRIALS_SCHEMA, write_trial


@pytest.fixture(scope="module")
def runs_root(loaded, calib, tmp_path_factory):
    """Two schemes x three budgets, plus a kl_div scheme: two scoring configurations."""
    root = tmp_path_factory.mktemp("analysis_runs")
    for name in ("fp8_autoquant_top50", "fp8_autoquant_all_layers_fp8"):
        for bits in (14.0, 11.0, 8.0):
            scheme = resolve_scheme(get_scheme(name), effective_bits=bits)
            run_scheme(loaded, calib, scheme, root / f"{name}_{bits:g}", cache_dir=root / "cache")
    kl = dataclasses.replace(resolve_scheme(get_scheme("fp8_autoquant_top25"), method="kl_div"), name="fp8_kl")
    run_scheme(loaded, calib, kl, root / "kl", cache_dir=root / "cache")
    return root


def test_tables_round_trip_with_documented_schema(runs_root, tmp_path):
    agg = aggregate([str(runs_root)], tmp_path / "tables")
    assert agg["num_trials"] == 7 and not agg["skipped"]
    files = sorted((tmp_path / "tables" / "layers").rglob("*.parquet"))
    assert len(files) == 7 and all(f.parent.name.startswith("scheme=") for f in files)
    schema = pq.read_schema(files[0])
    assert schema.remove_metadata().equals(LAYERS_SCHEMA.remove_metadata())
    assert pq.read_schema(next((tmp_path / "tables" / "trials").rglob("*.parquet"))).names == TRIALS_SCHEMA.names
    layers, trials = load_layers(tmp_path / "tables"), load_trials(tmp_path / "tables")
    assert len(layers) == 7 * 29 and len(trials) == 7
    assert str(layers["num_params"].dtype) == "int64" and str(layers["sensitivity"].dtype) == "float64"
    assert set(layers["kind"]) == {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}
    assert layers.loc[layers["layer"] == "lm_head", "block_index"].isna().all()
    # Table rows match their manifests.
    m = json.loads(next(runs_root.glob("fp8_autoquant_top50_11/*_quant_manifest.json")).read_text())
    row = trials[(trials["scheme"] == "fp8_autoquant_top50") & (trials["effective_bits_target"] == 11.0)].iloc[0]
    assert row["num_quantized_layers"] == m["num_quantized_layers"]
    assert row["effective_bits_achieved"] == pytest.approx(m["effective_bits"]["achieved"])
    lay = layers[(layers["trial_id"] == row["trial_id"]) & (layers["layer"] == "model.layers.1.mlp.up_proj")].iloc[0]
    assert lay["dtype"] == m["layers"]["model.layers.1.mlp.up_proj"]["dtype"]
    assert list(lay["candidate_formats"]) == ["FP8_DEFAULT_CFG", "NONE"]


def test_filters_on_scheme_and_bits(runs_root, tmp_path):
    aggregate([str(runs_root)], tmp_path / "t")
    t = load_trials(tmp_path / "t", filters={"scheme": "fp8_autoquant_top50"})
    assert set(t["scheme"]) == {"fp8_autoquant_top50"} and len(t) == 3
    t = load_trials(tmp_path / "t", filters=[("effective_bits_target", "<=", 11.0)])
    assert set(t["effective_bits_target"]) == {11.0, 8.0} and len(t) == 4
    lay = load_layers(tmp_path / "t", filters={"scheme": ["fp8_kl"], "kind": "lm_head"})
    assert len(lay) == 1 and lay.iloc[0]["method"] == "kl_div"


def test_duplicates_not_double_counted(runs_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs_root / "fp8_autoquant_top50_14", copy)
    aggregate([str(runs_root), str(copy)], tmp_path / "t")
    aggregate([str(runs_root)], tmp_path / "t")  # refresh: same trials again
    assert len(load_trials(tmp_path / "t")) == 7
    assert len(load_layers(tmp_path / "t")) == 7 * 29


def test_unified_schema_keeps_later_columns(runs_root, tmp_path):
    import pyarrow as pa

    aggregate([str(runs_root)], tmp_path / "t")
    # A later writer adds a column: readers must not drop it.
    f = sorted((tmp_path / "t" / "trials").rglob("*.parquet"))[-1]
    table = pq.read_table(f)
    pq.write_table(table.append_column("new_metric", pa.array([1.5])), f)
    t = load_trials(tmp_path / "t")
    assert "new_metric" in t and t["new_metric"].notna().sum() == 1


def test_old_schema_and_foreign_json_skipped_by_name(runs_root, tmp_path):
    m = json.loads(next(runs_root.glob("fp8_autoquant_top50_14/*_quant_manifest.json")).read_text())
    old = tmp_path / "old_quant_manifest.json"
    old.write_text(json.dumps({**m, "schema_version": 0}))
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"hello": "world"}')
    corrupt = tmp_path / "corrupt_quant_manifest.json"
    corrupt.write_text("{nope")
    agg = aggregate([str(runs_root / "fp8_autoquant_top50_14"), str(old), str(foreign), str(corrupt)], tmp_path / "t")
    reasons = dict(agg["skipped"])
    assert agg["num_trials"] == 1
    assert "schema_version 0" in reasons[str(old)] and "not an autoquant manifest" in reasons[str(foreign)]
    assert "not JSON" in reasons[str(corrupt)]
    with pytest.raises(UserError, match="no valid manifest"):
        aggregate([str(foreign), str(corrupt)], tmp_path / "t2")


def test_failed_trial_row(tmp_path):
    write_trial(tmp_path, None, scheme="fp8_bad", trial_id="t1", sweep_id="s", status="error",
                error="infeasible budget", effective_bits_target=7.0, method="gradient")
    t = load_trials(tmp_path)
    assert t.iloc[0]["status"] == "error" and t.iloc[0]["error"] == "infeasible budget"
    assert t.iloc[0]["effective_bits_target"] == 7.0


def test_summaries(runs_root, tmp_path):
    aggregate([str(runs_root)], tmp_path / "t")
    layers, trials = load_layers(tmp_path / "t"), load_trials(tmp_path / "t")
    curve = inclusion_curve(layers)
    top50 = curve[curve["scheme"] == "fp8_autoquant_top50"].sort_values("effective_bits_target", ascending=False)
    assert list(top50["weight_share"]) == sorted(top50["weight_share"])  # less budget, more FP8
    # At 8 bits every searched layer is FP8; lm_head is outside the default FP8 search and stays unquantized.
    one = layers[layers["trial_id"] == layers["trial_id"].iloc[0]]
    searched_share = 1 - one.loc[one["kind"] == "lm_head", "num_params"].sum() / one["num_params"].sum()
    assert top50["weight_share"].iloc[-1] == pytest.approx(searched_share)
    flips = flip_budgets(layers)
    f = flips[flips["scheme"] == "fp8_autoquant_top50"]
    assert f["flip_budget"].max() == 14.0 and f["flip_budget"].min() == 8.0
    front = pareto_front(trials)
    assert len(front) >= 2 and front["total_score"].is_monotonic_decreasing
    # Three distinct scorings (FP8_DEFAULT gradient, FP8_ALL_LAYERS gradient, FP8_DEFAULT kl_div), all on one
    # calibration set: none is independent of another, so no rank agreement is reported (old code: Spearman 1.0
    # between the two gradient scorings, the same computation done twice).
    assert len(independent_scorings(layers, trials)) == 3
    assert rank_agreement(layers, trials).empty


def test_analyze_cli_writes_report_and_plots(runs_root, tmp_path, capsys):
    out = tmp_path / "ana"
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert main(["analyze", str(runs_root), str(tmp_path / "junk.json"), "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "junk.json" in err
    text = (out / "analysis.md").read_text()
    for section in ("## Trials", "## Budget at which each layer flips", "## Rank agreement", "junk.json"):
        assert section in text
    for png in ("sensitivity_heatmap.png", "inclusion_curve.png", "pareto.png"):
        assert (out / png).stat().st_size > 5000
    assert not (out / "rank_agreement.png").exists()  # one calibration set: nothing independent to compare
    assert "No format was scored on two different calibration sets" in text
    assert main(["analyze", str(tmp_path / "junk.json"), "--output-dir", str(tmp_path / "none")]) == 2
    assert "no valid manifest" in capsys.readouterr().err


def test_analyze_api(runs_root, tmp_path):
    res = analyze([f"{runs_root}/*/*_quant_manifest.json"], tmp_path / "a")
    assert res["num_trials"] == 7 and len(res["plots"]) == 3


def test_rank_agreement_compares_one_format_across_independent_data(runs_root, loaded, tmp_path):
    """A second calibration set (another seed) scored by the INT4+FP8 mix: its FP8 scores are compared with the FP8
    scores of the first set (same format, other data), its INT4 scores with nothing (no other INT4 scoring)."""
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions

    seed1 = build_calibration_set(loaded.tokenizer, read_captions("demo"), max_samples=24, batch_size=4, seq_len=48,
                                  seed=1)
    run_scheme(loaded, seed1, resolve_scheme(get_scheme("int4w_fp8_autoquant_mix"), effective_bits=10.0),
               tmp_path / "mix_seed1", cache_dir=tmp_path / "cache")
    res = analyze([str(runs_root), str(tmp_path / "mix_seed1")], tmp_path / "ana")
    layers, trials = load_layers(tmp_path / "ana" / "tables"), load_trials(tmp_path / "ana" / "tables")
    agree = rank_agreement(layers, trials)
    assert len(agree) == 1
    row = agree.iloc[0]
    assert row["format"] == "FP8_DEFAULT_CFG" and row["differs"] == "seed" and row["groups"] == 16
    assert "seed=0" in row["scoring_a"] + row["scoring_b"] and "seed=1" in row["scoring_a"] + row["scoring_b"]
    # The FP8 column, not the group's top score (the mix's INT4 score): recompute Spearman from the FP8 scores.
    from auto_quantize_model.inference.metrics import spearman

    def fp8(trial_id):
        sub = layers[(layers["trial_id"] == trial_id) & layers["search_group"].notna()]
        sub = sub.drop_duplicates("search_group")
        return {g: list(s)[list(f).index("FP8_DEFAULT_CFG")] for g, f, s in
                zip(sub["search_group"], sub["candidate_formats"], sub["candidate_scores"]) if len(f) > 1}

    mix = trials.loc[trials["scheme"] == "int4w_fp8_autoquant_mix", "trial_id"].iloc[0]
    top50 = trials.loc[trials["scheme"] == "fp8_autoquant_top50", "trial_id"].sort_values().iloc[0]
    a, b = fp8(top50), fp8(mix)
    assert row["spearman"] == pytest.approx(spearman([a[g] for g in sorted(a)], [b[g] for g in sorted(a)]))
    assert (tmp_path / "ana" / "rank_agreement.png").is_file()
    assert "| FP8_DEFAULT_CFG |" in res["report"].read_text()


def test_unquantized_layers_carry_the_runs_dtype_and_old_manifests_are_relabelled(runs_root, tmp_path):
    """A float32 CPU run's unquantized layers read fp32 in manifests and tables; a schema-1 manifest (every
    unquantized layer "bf16") is read with its model's dtype."""
    from auto_quantize_model.autoquant.manifest import load_manifest

    path = next(runs_root.glob("fp8_autoquant_top50_11/*_quant_manifest.json"))
    m = json.loads(path.read_text())
    assert m["schema_version"] == 2 and m["model"]["dtype"] == "float32"
    assert m["layers"]["lm_head"]["dtype"] == "fp32" and "bf16" not in {lay["dtype"] for lay in m["layers"].values()}
    old = {**m, "schema_version": 1,
           "layers": {n: {**lay, **{k: "bf16" for k in ("dtype", "input_dtype") if lay[k] == "fp32"}}
                      for n, lay in m["layers"].items()}}
    (tmp_path / "old").mkdir()
    old_path = tmp_path / "old" / path.name
    old_path.write_text(json.dumps(old))
    assert load_manifest(old_path)["layers"] == m["layers"]
    aggregate([str(tmp_path / "old")], tmp_path / "t")
    layers = load_layers(tmp_path / "t")
    assert set(layers["dtype"]) == {"fp8", "fp32"}
    assert inclusion_curve(layers)["layer_share"].iloc[0] == pytest.approx(m["num_quantized_layers"] / 29)
    (tmp_path / "future.json").write_text(json.dumps({**m, "schema_version": 3}))
    with pytest.raises(UserError, match="schema_version 3; this tool reads versions 1, 2"):
        load_manifest(tmp_path / "future.json")
