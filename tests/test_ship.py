"""`autoquant ship`: from a finished sweep to an export of the chosen trial in one command; its refusals; the rules
behind it (analysis/pick.py) and the analysis.md section that names the trial to ship."""

from __future__ import annotations

import json
import math
import shlex

import pandas as pd
import pytest

from auto_quantize_model.analysis import load_trials
from auto_quantize_model.analysis.pick import ShipRule, pick, round_limit
from auto_quantize_model.cli import main
from auto_quantize_model.errors import UserError

# --- the rules, on rows shaped like the trials table (no model) -------------------------------------------------


def _rows(*specs: tuple[str, float, float, float, bool]) -> pd.DataFrame:
    """(trial id, bits over the budget's layers, bits over all LM Linears, KL, exportable) per trial."""
    return pd.DataFrame([{"trial_id": t, "scheme": t.split("@")[0], "effective_bits_target": b,
                          "effective_bits_achieved": b, "effective_bits_all_layers": a, "kl_mean": kl,
                          "perplexity": 2.0 * (1 + kl), "reference_perplexity": 2.0, "exportable": ex,
                          "status": "ok", "is_control": False, "manifest_path": f"/runs/{t}/m.json",
                          "quantization_formats": "FP8_DEFAULT_CFG" if ex else "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}
                         for t, b, a, kl, ex in specs])


ROWS = _rows(("full@12", 12.0, 12.6, 1e-4, True), ("full@10", 10.0, 10.9, 2e-4, True),
             ("all@10", 9.8, 9.8, 2e-4, True), ("mix@8", 7.7, 9.0, 1.5e-4, False),
             ("full@8", 8.0, 9.28, 3e-4, True))


def test_bits_limit_picks_the_lowest_kl_on_the_stated_basis():
    # All-layer basis (default): within 10 bits only all@10, mix@8 and full@8 fit; mix@8 has the lowest KL but export
    # cannot take it, so the rule refuses and names the best exportable trial under it.
    with pytest.raises(UserError, match=r"winner mix@8 .* cannot be exported .* best exportable trial under this rule "
                                        r"is all@10"):
        pick(ROWS, ShipRule(max_bits=10))
    assert pick(ROWS, ShipRule(max_bits=10, exportable_only=True)).winner["trial_id"] == "all@10"
    # Budget basis: full@10 (10.0) fits too, and ties all@10 on KL: fewer bits wins the tie, on the rule's basis.
    chosen = pick(ROWS, ShipRule(max_bits=10, bits_basis="budget", exportable_only=True))
    assert chosen.winner["trial_id"] == "all@10" and chosen.runner_up["trial_id"] == "full@10"
    assert "tied on KL: broken by fewer bits" in chosen.line()


def test_kl_and_perplexity_limits_pick_the_fewest_bits():
    chosen = pick(ROWS, ShipRule(max_kl=2e-4, exportable_only=True))
    assert chosen.winner["trial_id"] == "all@10"  # 9.8 bits over all LM Linears; full@8 (9.28) has KL 3e-4
    assert "fewest bits over all LM Linears at KL <= 0.0002" in chosen.line()
    # Perplexity +0.02% (all@10) is within +0.025%; so is mix@8's, which has fewer bits but cannot be exported.
    assert pick(ROWS, ShipRule(max_ppl_increase=0.025, exportable_only=True)).winner["trial_id"] == "all@10"
    with pytest.raises(UserError, match="winner mix@8"):
        pick(ROWS, ShipRule(max_ppl_increase=0.025))


def test_ties_on_both_measures_go_to_the_smaller_trial_id():
    rows = _rows(("b", 10.0, 10.0, 1e-4, True), ("a", 10.0, 10.0, 1e-4, True))
    chosen = pick(rows, ShipRule(max_bits=12))
    assert (chosen.winner["trial_id"], chosen.runner_up["trial_id"]) == ("a", "b")


def test_nothing_fits_names_the_nearest_exportable_trial():
    with pytest.raises(UserError, match=r"no trial of 5 satisfies 'lowest KL within 8 bits over all LM Linears'; "
                                        r"nearest: full@8 \(KL 0.0003"):
        pick(ROWS, ShipRule(max_bits=8))


def test_named_trial_and_refusals():
    assert pick(ROWS, ShipRule(trial="all@1")).winner["trial_id"] == "all@10"  # a unique part of the id
    with pytest.raises(UserError, match=r"trial mix@8 cannot be exported .* nearest exportable: full@8"):
        pick(ROWS, ShipRule(trial="mix@8"))
    with pytest.raises(UserError, match="matches 3 trials"):
        pick(ROWS, ShipRule(trial="full"))
    with pytest.raises(UserError, match="drop the rule flags"):
        ShipRule(trial="x", max_kl=1.0)
    with pytest.raises(UserError, match="give a rule"):
        ShipRule()
    with pytest.raises(UserError, match="no trial was measured"):
        pick(ROWS, ShipRule(min_prefill_speedup=1.2))


def test_limits_printed_for_commands_admit_the_trial_they_come_from():
    assert round_limit(9.28125) == 9.282 and round_limit(0.000219171) == 0.0002192
    assert round_limit(1.3456, upper=False) == 1.345 and round_limit(8.0) == 8.0
    rows = _rows(("a", 9.0, 9.28125, 1e-4, True))
    assert pick(rows, ShipRule(max_bits=float(f"{9.28125:.6g}"))).winner["trial_id"] == "a"
    assert math.isclose(pick(rows, ShipRule(max_bits=round_limit(9.28125))).winner["effective_bits_all_layers"],
                        9.28125)


def test_rounded_limits_never_cross_the_value_and_flags_read_back_exactly():
    """A value a hair above a 4-digit number (1.2340000000001e-5) was rounded to 1.234e-5, below itself, and a
    flag printed with 6 digits read back as another limit: the printed command then refused its own trial."""
    import random

    rng = random.Random(0)
    values = [1.2340000000001e-5, 9.2810000000004, 0.99999999999, 1.0000000001]
    values += [rng.uniform(0.5, 1.5) * 10.0 ** rng.randint(-9, 3) for _ in range(2000)]
    for x in values:
        assert round_limit(x) >= x and round_limit(x, upper=False) <= x, x
    for x in (1.23456789e-5, 9.28125, 1e-7 / 3):
        flags = ShipRule(max_kl=x).flags()
        assert float(flags[flags.index("--max-kl") + 1]) == x


def test_pareto_points_are_labelled_and_non_exportable_ones_hollow():
    import matplotlib.pyplot as plt

    from auto_quantize_model.analysis.plots import _draw_front

    fig, ax = plt.subplots()
    labels = _draw_front(ax, ROWS, "effective_bits_all_layers", "kl_mean")
    plt.close(fig)
    # The front of all trials (mix@8, full@12) and of the exportable ones (full@8, all@10, full@12), numbered by bits.
    assert labels == ["1: mix@7.7 [mix@8] (not exportable)", "2: full@8 [full@8]", "3: all@9.8 [all@10]",
                      "4: full@12 [full@12]"]
    hollow = [c for c in ax.collections if len(c.get_offsets()) and not c.get_facecolors()[:, 3].any()]
    assert [list(c.get_offsets()[0]) for c in hollow] == [[9.0, 1.5e-4]]


# --- a finished sweep, shipped ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(ray_cluster, tiny_model_dir, tmp_path_factory):
    """FP8 and INT4+FP8 at 10 and 6 bits, evaluated: full@6 cannot reach its budget (a failed trial), mix@6 needs
    INT4 layers (not exportable), the others are FP8/BF16 only."""
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import load_sweep_spec

    root = tmp_path_factory.mktemp("ship")
    spec = load_sweep_spec(None, {
        "name": "ship", "model_dir": str(tiny_model_dir), "storage_path": str(root / "sweeps"), "captions_path": "demo",
        "max_calib_samples": 16, "batch_size": 4, "calib_seq_len": 32, "evaluate": True, "max_eval_samples": 8,
        "schemes": ("fp8_autoquant_full", "int4w_fp8_autoquant_mix"), "effective_bits": (10.0, 6.0)})
    res = run_sweep(spec)
    trials = load_trials(res["tables"])
    return {"dir": res["sweep_dir"], "root": root, "trials": trials, "summary": res["summary"]}


def _ship_line(out: str) -> str:
    """The pick's line (ModelOpt prints its own lines to stdout while restoring quantizers)."""
    return next(line for line in out.splitlines() if line.startswith("ship: "))


def _ok(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[(trials["status"] == "ok") & ~trials["is_control"].fillna(False).astype(bool)]


def test_sweep_tables_say_which_trials_export(sweep):
    ok = _ok(sweep["trials"])
    mix6 = sweep["trials"][sweep["trials"]["trial_id"].str.startswith("int4w_fp8_autoquant_mix-b6")].iloc[0]
    assert not mix6["exportable"]  # INT4 layers
    full10 = sweep["trials"][sweep["trials"]["trial_id"].str.startswith("fp8_autoquant_full-b10")].iloc[0]
    assert full10["exportable"] and len(ok) == 3
    # One basis per column: the control has no budget, so no budget-basis bits; its all-layer bits are what the
    # default FP8 trial at 8 bits would be (lm_head at 16).
    control = sweep["trials"][sweep["trials"]["is_control"].fillna(False).astype(bool)].iloc[0]
    assert pd.isna(control["effective_bits_achieved"]) and 9.0 < control["effective_bits_all_layers"] < 9.5
    assert "| all LM Linears |" in sweep["summary"] and "| exportable |" in sweep["summary"]


def test_ship_exports_the_chosen_trial_and_says_how_to_serve_it(sweep, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["ship", sweep["dir"], "--max-kl", "1", "--exportable-only", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    # The fewest bits over all LM Linears among exportable trials (any KL is within 1); ties by KL, then trial id
    # (the mix at 10 bits picks the full scheme's layers on the tiny model: same bits, same KL).
    ok = _ok(sweep["trials"])
    best = ok[ok["exportable"].astype(bool)].sort_values(["effective_bits_all_layers", "kl_mean", "trial_id"]).iloc[0]
    assert _ship_line(text).startswith(f"ship: {best['trial_id']} (")
    assert "fewest bits over all LM Linears at KL <= 1 among exportable trials" in text
    assert ("runner-up" in text) == bool(ok["exportable"].astype(bool).sum() > 1)
    info = json.loads((out / "autoquant_export.json").read_text())
    assert info["run"]["name"] == best["trial_id"]
    assert f"vllm serve {out} --quantization modelopt" in text
    assert f"python -m sglang.launch_server --model-path {out} --quantization modelopt" in text


def test_ship_refuses_in_one_line_and_writes_nothing(sweep, tmp_path, capsys):
    out = tmp_path / "nothing"
    mix6 = _ok(sweep["trials"]).query("exportable == False")["trial_id"].iloc[0]
    cases = [
        (["--max-kl", "1"], "cannot be exported"),  # fewest bits: mix@6, which export cannot take
        (["--max-bits", "1"], "no trial of 3 satisfies"),
        (["--trial", mix6], "nearest exportable: "),
        (["--trial", "no-such-trial"], "no trial 'no-such-trial'"),
    ]
    for flags, message in cases:
        assert main(["ship", sweep["dir"], *flags, "--output-dir", str(out)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not out.exists()
    full10 = _ok(sweep["trials"]).query("exportable == True")["trial_id"].iloc[0]
    assert main(["ship", sweep["dir"], "--trial", full10, "--model-dir", str(tmp_path / "nowhere"),
                 "--output-dir", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["ship", sweep["dir"], "--max-kl", "1", "--exportable-only", "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["x"]


def test_analysis_names_the_trial_to_ship_and_its_command_ships_it(sweep, tmp_path, capsys):
    from auto_quantize_model.analysis.report import analyze

    text = analyze([sweep["dir"]], tmp_path / "ana")["report"].read_text()
    section = text.split("## Which trial to ship")[1].split("\n## ")[0]
    commands = [line for line in section.splitlines() if line.startswith("autoquant ship ")]
    assert "**1. As accurate as uniform FP8 PTQ" in section and "**3. Perplexity within 1%" in section
    assert commands and len(commands) == section.count("ship `")
    named = section.split("ship `")[1].split("`")[0]
    argv = shlex.split(commands[0])[1:]
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "shipped")
    assert main(argv) == 0
    assert _ship_line(capsys.readouterr().out).startswith(f"ship: {named} (")
    assert json.loads((tmp_path / "shipped" / "autoquant_export.json").read_text())["run"]["name"] == named
    # The trials table names every trial and its manifest, and says whether it exports.
    trials_md = text.split("## Trials")[1].split("\n## ")[0]
    assert "| trial_id | scheme |" in trials_md and "| exportable |" in trials_md
    assert all(t in trials_md for t in _ok(sweep["trials"])["trial_id"])
    assert "_quant_manifest.json |" in trials_md


def test_ship_in_compressed_tensors_with_an_fp8_kv_cache(sweep, tmp_path, capsys):
    """--format and --kv-cache reach the export; the serve lines name only the engines whose load is checked for
    that format (vLLM's compressed-tensors rules; no --quantization flag: vLLM reads config.json)."""
    out = tmp_path / "ct"
    assert main(["ship", sweep["dir"], "--max-kl", "1", "--exportable-only", "--output-dir", str(out),
                 "--format", "compressed-tensors", "--kv-cache", "fp8"]) == 0
    text = capsys.readouterr().out
    info = json.loads((out / "autoquant_export.json").read_text())
    assert info["format"] == "compressed-tensors" and info["kv_cache"]["calibrated"] is True
    assert f"serve (vLLM, not run here): vllm serve {out}\n" in text and "sglang" not in text
