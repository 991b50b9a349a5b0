"""The Ray sweep on a local Ray with fake GPUs: grid, shared scoring, faults, resume, tables."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import kill_first_busy_worker

from auto_quantize_model.analysis import load_layers, load_trials
from auto_quantize_model.errors import UserError
from auto_quantize_model.sweep.spec import SweepSpec, assign_scoring_keys, expand_grid, load_sweep_spec

FP8_SCHEMES = ("fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full")
REPO = Path(__file__).resolve().parent.parent
IDENTITY = {"weights_fingerprint": "w", "config_hash": "c", "dtype": "float32", "scope": "language_model",
            "calibration_hash": "t", "num_batches": 16, "batch_size": 4}


def _spec(tiny_model_dir, tmp_path, **kw) -> SweepSpec:
    base = {"name": "s", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path / "sweeps"),
            "captions_path": "demo", "max_calib_samples": 16, "batch_size": 4, "calib_seq_len": 32,
            "schemes": ("fp8_autoquant_top25",), "effective_bits": (12.0,)}
    return load_sweep_spec(None, {**base, **kw})


def test_grid_expansion_and_scoring_keys(tiny_model_dir, tmp_path):
    spec = _spec(tiny_model_dir, tmp_path, schemes=(*FP8_SCHEMES, "fp8_autoquant_all_layers_fp8", "nope"),
                 effective_bits=(14, 12, 10), methods=("gradient", "kl_div"))
    trials = expand_grid(spec)
    # top25/top50/full differ only in their default budget: with the budget swept they are one experiment.
    assert len(trials) == 3 * 3 * 2
    assert all(t.equivalent_schemes == ("fp8_autoquant_top50", "fp8_autoquant_full")
               for t in trials if t.scheme == "fp8_autoquant_top25")
    assert len({t.trial_id for t in trials}) == len(trials)
    assert expand_grid(spec) == trials  # deterministic
    # Keys come from the run's own identity function, once the workers report the model and data they loaded.
    identity = {"weights_fingerprint": "w", "config_hash": "c", "dtype": "float32", "scope": "language_model",
                "calibration_hash": "t", "num_batches": 16, "batch_size": 4}
    trials = assign_scoring_keys(trials, identity)
    errors = {t.trial_id for t in trials if t.error is not None}
    assert errors == {t.trial_id for t in trials if t.scheme == "nope"}
    keys = {t.scoring_key for t in trials if t.scheme in FP8_SCHEMES}
    assert len(keys) == 2  # FP8_DEFAULT_CFG x {gradient, kl_div}, whatever the bits target
    all_layers = {t.scoring_key for t in trials if t.scheme == "fp8_autoquant_all_layers_fp8"}
    assert len(all_layers) == 2 and not all_layers & keys
    assert all(t.scoring_key is None for t in trials if t.scheme == "nope")
    default = expand_grid(_spec(tiny_model_dir, tmp_path, schemes=FP8_SCHEMES, effective_bits=()))
    assert [t.effective_bits_target for t in default] == [14.0, 12.0, 8.0]  # each scheme's own budget


MINE = '[schemes.mine]\ncandidate_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = 12\ndisabled_layers = ["*layers.0.*"]\n'


def test_grid_trials_are_resolved_once_and_carry_their_errors(tiny_model_dir, tmp_path):
    """Old code: expand_grid gave string-keyed dicts and every consumer resolved the scheme again."""
    from auto_quantize_model.actors.trial import Trial
    from auto_quantize_model.configs.schemes import get_scheme, resolve_scheme

    f = tmp_path / "mine.toml"
    f.write_text(MINE)
    spec = _spec(tiny_model_dir, tmp_path, schemes=("fp8_autoquant_top25", "mine", "nope"),
                 effective_bits=(12, 7.0), schemes_file=str(f))
    trials = expand_grid(spec)
    assert len(trials) == 6 and all(isinstance(t, Trial) for t in trials)
    for t in trials:
        assert type(t.effective_bits_target) is float
        if t.scheme == "nope":
            assert t.resolved is None and "unknown scheme 'nope'" in str(t.error)
        elif t.effective_bits_target == 7.0:
            assert t.resolved is None and "between 8 and 16" in str(t.error)
        else:
            assert t.error is None and t.resolved == resolve_scheme(
                get_scheme(t.scheme, f), effective_bits=12.0, method="gradient", num_score_steps=16)  # calib: all batches
    assert next(t for t in trials if t.scheme == "mine" and t.resolved).resolved.disabled_layers == ("*layers.0.*",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trials[0].effective_bits_target = 10.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="resolved scheme or the error"):
        dataclasses.replace(trials[0], resolved=None)


def test_trial_ids_are_those_of_earlier_sweeps(tiny_model_dir, monkeypatch):
    """Resume finds finished trials by id: these are the ids the string-keyed grid gave (recipe path, steps, errors)."""
    monkeypatch.chdir(REPO)
    spec = load_sweep_spec(None, {"name": "g", "model_dir": str(tiny_model_dir), "num_calib_steps": 8,
                                  "schemes": ("fp8_autoquant_top25", "nope", "examples/recipes/int4w_fp8_lm_at_10bits.yaml"),
                                  "effective_bits": (14, 7.5), "num_score_steps": (16, 32)})
    assert [t.trial_id for t in expand_grid(spec)] == [
        "fp8_autoquant_top25-b14-gradient-s16-dd08b5e0", "fp8_autoquant_top25-b14-gradient-s32-f64fb5cc",
        "fp8_autoquant_top25-b7.5-gradient-s16-a4b6489c", "fp8_autoquant_top25-b7.5-gradient-s32-90720ffa",
        "nope-b14-gradient-s16-8efde7c7", "nope-b14-gradient-s32-75bb1a84", "nope-b7.5-gradient-s16-f7f91142",
        "nope-b7.5-gradient-s32-8453136a", "int4w_fp8_lm_at_10bits-b14-gradient-s16-ced6558d",
        "int4w_fp8_lm_at_10bits-b14-gradient-s32-37c73a62", "int4w_fp8_lm_at_10bits-b7.5-gradient-s16-10ae7f2f",
        "int4w_fp8_lm_at_10bits-b7.5-gradient-s32-bd1b371a"]
    own = load_sweep_spec(None, {"name": "g", "model_dir": str(tiny_model_dir),
                                 "schemes": ("fp8_autoquant_top25", "examples/recipes/int4w_fp8_lm_at_10bits.yaml")})
    # Scheme defaults: calibration on every loaded batch (num_calib_steps None, was 16), a new experiment, so new ids.
    assert [t.trial_id for t in expand_grid(own)] == ["fp8_autoquant_top25-b14-gradient-s16-d50971f1",
                                                      "int4w_fp8_lm_at_10bits-b10-gradient-sauto-5fd47901"]


def test_trial_round_trips_through_json_and_result_json(tiny_model_dir, tmp_path):
    from auto_quantize_model.actors.trial import Trial
    from auto_quantize_model.io_utils import atomic_write_json
    from auto_quantize_model.sweep.trial import RESULT_FILE, finished_result

    spec = _spec(tiny_model_dir, tmp_path, schemes=("fp8_autoquant_full", "int4w_fp8_autoquant_mix", "nope"),
                 effective_bits=(12.0, 9.0))
    trials = assign_scoring_keys(expand_grid(spec), IDENTITY)
    assert any(t.scoring_pass for t in trials) and any(t.error for t in trials)
    for t in trials:
        assert Trial.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    # A finished trial is recognised by its exact settings, resolved scheme and scoring fields included.
    done = trials[0]
    atomic_write_json(tmp_path / done.trial_id / RESULT_FILE, {"trial": done.to_dict(), "result": {"status": "ok"}})
    assert finished_result(tmp_path, done) == {"status": "ok"}
    assert finished_result(tmp_path, dataclasses.replace(done, scoring_key="other")) is None


def test_summary_reads_the_budget_from_one_float_field(tiny_model_dir, tmp_path):
    """The target is ``effective_bits_target`` in the trial, the outcome row and the summary's rows (old code: the
    trial called it ``effective_bits`` and the summary read that)."""
    from auto_quantize_model.actors.trial import Trial
    from auto_quantize_model.records.outcome import TrialOutcome
    from auto_quantize_model.sweep.driver import INTERRUPTED, render_summary

    budget = {f.name: f.type for f in dataclasses.fields(Trial) if f.name.startswith("effective_bits")}
    assert budget == {"effective_bits_target": "float"}
    assert "effective_bits_target" in {f.name for f in dataclasses.fields(TrialOutcome)}
    spec = _spec(tiny_model_dir, tmp_path, schemes=("fp8_autoquant_top25", "fp8_autoquant_top50", "nope"),
                 effective_bits=(12, 10.5))
    ok, interrupted, nope, _ = expand_grid(spec)
    row = TrialOutcome(trial_id=ok.trial_id, effective_bits_target=12.0, effective_bits_achieved=11.875,
                       effective_bits_all_layers=12.64, num_quantized_layers=9, num_layers=28, budget_met=True,
                       kl_mean=0.0123, exportable=True).to_row()
    row.pop("trial_id")
    row.pop("equivalent_schemes")  # as the worker reports it: the trial holds the list
    rows = [{**ok.to_dict(), **row, "scored": True}, {**interrupted.to_dict(), "status": INTERRUPTED},
            {**nope.to_dict(), "status": "error"}]
    assert all(type(r["effective_bits_target"]) is float for r in rows)
    text = render_summary(spec, rows, {"passes": {"k": 1}, "reuses": {}}, 12.34, 2)
    # Both bits bases, side by side (old code: the budget basis alone, so full@8 and all_layers@8 both read 8.000).
    assert text.splitlines()[2:-2] == [
        "3 trials (1 ok) on 2 worker(s) in 12.3 s; scoring passes per key: {'k': 1}; reuses: {}", "",
        "| trial | scheme | bits target | achieved (budget) | all LM Linears | quantized layers | met | scores | ppl "
        "| KL mean | exportable | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {ok.trial_id} | fp8_autoquant_top25 = fp8_autoquant_top50 | 12 | 11.875 | 12.640 | 9/28 | True | computed "
        "| - | 0.0123 | yes | ok |",
        f"| {interrupted.trial_id} | fp8_autoquant_top25 = fp8_autoquant_top50 | 10.5 | - | - | - | - | - | - | - | - "
        "| interrupted |",
        f"| {nope.trial_id} | nope | 12 | - | - | - | - | - | - | - | - | ERROR: {nope.error[:120]} |"]
    assert text.splitlines()[-1].startswith(f"Ship a trial: `autoquant ship {spec.sweep_dir} --trial ID")


def test_spec_from_toml_with_overrides(tiny_model_dir, tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text(f'name = "a"\nmodel_dir = "{tiny_model_dir}"\nschemes = ["fp8_autoquant_top50"]\n'
                 'effective_bits = [12, 10]\n[worker]\nnum_gpus = 1\nnum_cpus = 2\npristine = "cpu"\n')
    spec = load_sweep_spec(f, {"name": "b", "effective_bits": None})
    assert spec.name == "b" and spec.effective_bits == (12, 10) and spec.worker.pristine == "cpu"
    assert json.loads(json.dumps(spec.to_dict()))["worker"]["num_cpus"] == 2
    for bad, match in [({"bogus": 1}, "unknown sweep settings"), ({"batch_size": 0}, "positive"),
                       ({"model_dir": ""}, "model_dir")]:
        with pytest.raises(UserError, match=match):
            load_sweep_spec(f, bad)
    (tmp_path / "bad.toml").write_text('[worker]\npristine = "disk"\nname="x"\n')
    with pytest.raises(UserError):
        load_sweep_spec(tmp_path / "bad.toml", {"name": "x", "model_dir": str(tiny_model_dir)})


@pytest.mark.timeout(420)
def test_sweep_shares_scoring_records_failures_and_writes_tables(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.driver import run_sweep

    spec = _spec(tiny_model_dir, tmp_path, schemes=(*FP8_SCHEMES, "fp8_autoquant_all_layers_fp8", "nope"),
                 effective_bits=(14.0, 11.0, 7.0), evaluate=True, max_eval_samples=8)
    res = run_sweep(spec)
    rows = {r["trial_id"]: r for r in res["rows"]}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    failed = [r for r in rows.values() if r["status"] != "ok"]
    # top25/top50/full at the same budget are one experiment (run once); 7 bits fails for each of them.
    assert res["num_workers"] == 2 and len(rows) == 11
    # 7 bits is below what FP8 reaches, and 'nope' is no scheme: those trials fail alone, with the reason.
    assert len(ok) == 4 and len(failed) == 7
    assert all("between 8 and 16" in r["error"] or "unknown scheme" in r["error"] for r in failed)
    # They never reached a worker: the driver recorded them from the errors their trials carry.
    assert all("worker" not in r and type(r["effective_bits_target"]) is float for r in failed)
    # K distinct scoring keys -> exactly K scoring passes, whatever the number of bits targets or workers.
    assert res["stats"]["passes"] == {k: 1 for k in {r["scoring_key"] for r in ok}}
    assert len(res["stats"]["passes"]) == 2
    assert sum(r["scored"] for r in ok) == 2 and sum(not r["scored"] for r in ok) == 2
    assert all(r["perplexity"] > 1 and r["kl_mean"] >= 0 for r in ok)
    # Tables: one trials row per trial (failures included), 29 layer rows per ok trial, no duplicates.
    # ... plus one row for the uniform FP8 PTQ control (all trials share calibration data and steps).
    trials = load_trials(res["tables"])
    assert len(trials) == 12 and trials["trial_id"].is_unique
    control = trials[trials["is_control"].fillna(False).astype(bool)]
    assert len(control) == 1 and control["scheme"].iloc[0] == "uniform_fp8_ptq"
    assert control["kl_mean"].iloc[0] > 0 and control["num_quantized_layers"].iloc[0] == 28
    assert control["reference_dtype"].iloc[0] == "float32"
    assert set(trials.loc[trials["status"] == "error", "trial_id"]) == {r["trial_id"] for r in failed}
    assert (trials.loc[trials["status"] == "error", "effective_bits_target"].isin([14.0, 11.0, 7.0])).all()
    assert trials.loc[trials["status"] == "ok", "perplexity"].notna().all()
    layers = load_layers(res["tables"])
    assert len(layers) == 4 * 29 and not layers.duplicated(["trial_id", "layer"]).any()
    for r in ok:
        trial_dir = tmp_path / "sweeps" / "s" / "autoquant" / "trials" / r["trial_id"]
        assert (trial_dir / f"{r['scheme']}_quant_manifest.json").is_file()
        assert (trial_dir / "layer-sensitivity-report.md").is_file() and (trial_dir / "result.json").is_file()
    assert "scoring passes per key" in (tmp_path / "sweeps" / "s" / "summary.md").read_text()
    # `analyze` on the sweep directory finds the control record and reports it.
    from auto_quantize_model.analysis.report import analyze

    ana = analyze([res["sweep_dir"]], tmp_path / "ana")
    text = ana["report"].read_text()
    assert "### Control: uniform FP8 PTQ" in text and "float32" in text
    assert load_trials(tmp_path / "ana" / "tables")["is_control"].fillna(False).astype(bool).sum() == 1
    with pytest.raises(UserError, match="already exists"):
        run_sweep(spec)


@pytest.mark.timeout(300)
def test_restore_leaves_no_trace(ray_cluster, tiny_model_dir, tmp_path):
    import ray

    from auto_quantize_model.sweep.spec import expand_grid
    from auto_quantize_model.sweep.workers import start_workers

    spec = _spec(tiny_model_dir, tmp_path, name="restore", effective_bits=(8.0,), worker={"num_gpus": 1, "num_cpus": 0.5})
    pool, workers, _, _ = start_workers(spec, 1)
    try:
        (trial,) = expand_grid(spec)
        out = {k: str(tmp_path / k) for k in ("trials", "tables", "cache")}
        manifests = []
        for _ in range(2):
            lease = ray.get(pool.acquire.remote(trial.trial_id, trial.scoring_key))
            res = ray.get(workers[0].run_trial.remote(trial, lease, out))
            assert res["status"] == "ok" and res["num_quantized_layers"] == 28  # all but the excluded lm_head
            # After an all-FP8 trial, a fresh copy is bit-identical to the freshly loaded model.
            assert ray.get(workers[0].probe_matches.remote())
            path = tmp_path / "trials" / trial.trial_id / "fp8_autoquant_top25_quant_manifest.json"
            manifests.append(json.loads(path.read_text()))
        assert manifests[0]["layers"] == manifests[1]["layers"]
        assert ray.get(pool.stats.remote())["busy"] == {}  # the worker gave its lease back
    finally:
        for a in (*workers, pool):
            ray.kill(a)


@pytest.mark.timeout(300)
def test_worker_runs_the_drivers_scheme_without_the_schemes_file(ray_cluster, tiny_model_dir, tmp_path):
    """Old code: the worker resolved the trial again from the schemes file on its node; gone, the trial failed."""
    import ray

    from auto_quantize_model.sweep.workers import start_workers

    f = tmp_path / "mine.toml"
    f.write_text(MINE)
    spec = _spec(tiny_model_dir, tmp_path, name="nofile", schemes=("mine",), effective_bits=(10,), schemes_file=str(f),
                 worker={"num_gpus": 0, "num_cpus": 0.5})
    (trial,) = expand_grid(spec)
    f.unlink()  # resolved on the driver; a node without the file (or with another one) runs the same scheme
    pool, workers, _, identity = start_workers(spec, 1)
    try:
        (trial,) = assign_scoring_keys([trial], identity)
        out = {k: str(tmp_path / k) for k in ("trials", "tables", "cache")}
        lease = ray.get(pool.acquire.remote(trial.trial_id, trial.lease_key))
        res = ray.get(workers[0].run_trial.remote(trial, lease, out))
        assert res["status"] == "ok", res
        assert res["scheme"] == "mine" and type(res["effective_bits_target"]) is float and res["effective_bits_target"] == 10.0
        m = json.loads((tmp_path / "trials" / trial.trial_id / "mine_quant_manifest.json").read_text())
        assert m["scheme"]["disabled_layers"] == ["*layers.0.*"]
    finally:
        for a in (*workers, pool):
            ray.kill(a)


@pytest.mark.timeout(420)
def test_worker_killed_mid_trial_sweep_finishes_each_trial_once(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.driver import run_sweep

    spec = _spec(tiny_model_dir, tmp_path, name="faults", schemes=("fp8_autoquant_top25", "fp8_autoquant_all_layers_fp8"),
                 effective_bits=(14.0, 10.0), max_calib_samples=48, max_failures=3)
    t, killed = kill_first_busy_worker("faults")
    res = run_sweep(spec)
    t.join(5)
    assert killed, "the test never caught a busy worker"
    rows = res["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    trials = load_trials(res["tables"])
    assert len(trials) == 4 and trials["trial_id"].is_unique and (trials["status"] == "ok").all()
    assert len(load_layers(res["tables"])) == 4 * 29


@pytest.mark.timeout(600)
def test_resume_after_interrupted_sweep_runs_only_unfinished(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.driver import run_sweep

    storage = tmp_path / "sweeps"
    args = [sys.executable, "-m", "auto_quantize_model.cli", "sweep", "--name", "resume", "--model-dir", str(tiny_model_dir),
            "--storage-path", str(storage), "--captions-path", "demo", "--schemes", "fp8_autoquant_top25,fp8_autoquant_all_layers_fp8",
            "--effective-bits", "15,13,11,9", "--max-calib-samples", "16", "--calib-seq-len", "32", "--address", ray_cluster]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials_dir = storage / "resume" / "autoquant" / "trials"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(trials_dir.glob("*/result.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep, as with a lost SSH session
    proc.wait(30)
    # Ray reaps the dead job's actors a moment later; a trial in flight meanwhile may still finish. What is finished
    # once the job's pool and workers are gone is what the resumed sweep must not run again.
    import ray
    from ray.util import list_named_actors

    deadline = time.time() + 60
    while time.time() < deadline and any(a["name"].startswith(("autoquant-pool-resume", "autoquant-worker-resume"))
                                         for a in list_named_actors(all_namespaces=True)):
        time.sleep(0.2)
    time.sleep(1)
    assert ray.is_initialized()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in trials_dir.glob("*/result.json")}
    assert 2 <= len(done_before) < 8
    spec = load_sweep_spec(None, {"name": "resume", "model_dir": str(tiny_model_dir), "storage_path": str(storage),
                                  "captions_path": "demo", "schemes": ("fp8_autoquant_top25", "fp8_autoquant_all_layers_fp8"),
                                  "effective_bits": (15.0, 13.0, 11.0, 9.0), "max_calib_samples": 16, "calib_seq_len": 32})
    res = run_sweep(spec, resume=True)
    rows = res["rows"]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), rows
    for tid, mtime in done_before.items():  # finished trials were not run again
        assert (trials_dir / tid / "result.json").stat().st_mtime_ns == mtime
    rerun = [r for r in rows if r["trial_id"] not in done_before]
    assert all(not r.get("from_previous_run") for r in rerun)
    trials = load_trials(res["tables"])
    assert len(trials) == 8 and trials["trial_id"].is_unique
    assert len(load_layers(res["tables"])) == 8 * 29


def _readme_excerpts():
    """scripts/readme_excerpts.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_excerpts", REPO / "scripts" / "readme_excerpts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_excerpt_blocks_round_trip():
    ex = _readme_excerpts()
    text = "a\n<!-- excerpt:demo -->\n```\nold 1.5 s\n```\n<!-- /excerpt -->\nb\n"
    assert ex.excerpts(text) == {"demo": "old 1.5 s"}
    new = ex.replace_excerpts(text, {"demo": "new 2.0 s"})
    assert new == text.replace("old 1.5 s", "new 2.0 s") and ex.normalized("in 2.0 s") == ex.normalized("in 31.5 s")
    assert set(ex.excerpts((REPO / "README.md").read_text())) == {"demo", "compare"}


@pytest.mark.timeout(420)
def test_demo_command_is_a_sweep_with_analysis(ray_cluster, tmp_path, capsys):
    from auto_quantize_model.cli import main

    # One worker, as `bash scripts/demo.sh` has on a machine without GPUs (this test's Ray has 2 fake ones).
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--num-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "12 trials (12 ok)" in out and "scoring passes per key" in out
    # README.md's demo excerpt is what the demo prints, wall-clock times aside: rerun scripts/readme_excerpts.py
    # whenever this fails.
    ex = _readme_excerpts()
    readme = ex.excerpts((REPO / "README.md").read_text(encoding="utf-8"))["demo"]
    assert ex.normalized(readme) == ex.normalized(ex.demo_excerpt(out, tmp_path / "demo")), \
        "README.md's demo excerpt is stale: run python scripts/readme_excerpts.py"
    assert (tmp_path / "demo" / "analysis" / "analysis.md").is_file()
    trials = load_trials(tmp_path / "demo" / "sweeps" / "demo" / "autoquant" / "tables")
    assert len(trials) == 13 and trials["is_control"].fillna(False).astype(bool).sum() == 1  # 12 + the control
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0  # a second run resumes, no error
