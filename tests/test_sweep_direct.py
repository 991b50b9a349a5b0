"""The direct scheduler (``sweep/direct.py``): the driver's own threads run the units, with the outputs of the Tune
scheduler. On the old code there is no ``scheduler`` setting: every sweep went through Tune, whose start (5-8 s on
the H100, 5 s here) came before the first trial of a repeat sweep on kept workers."""

from __future__ import annotations

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
from auto_quantize_model.sweep.spec import expand_grid, load_sweep_spec

REPO = Path(__file__).resolve().parent.parent


def _spec(tiny_model_dir, tmp_path, **kw):
    base = {"name": "d", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path / "sweeps"),
            "captions_path": "demo", "max_calib_samples": 16, "batch_size": 4, "calib_seq_len": 32,
            "schemes": ("fp8_autoquant_full", "fp8_autoquant_all_layers_fp8", "nope"),
            "effective_bits": (14.0, 10.0), "num_workers": 1, "worker": {"num_gpus": 0}}
    return load_sweep_spec(None, {**base, **kw})


def _block_manifest(spec, trial_id: str) -> None:
    """A directory where the trial's manifest goes: its worker fails with an OSError (not a UserError)."""
    from auto_quantize_model.autoquant.manifest import manifest_path

    trial = next(t for t in expand_grid(spec) if t.trial_id == trial_id)
    blocker = manifest_path(spec.sweep_dir / "autoquant" / "trials" / trial_id, trial.scheme)
    (blocker / "x").mkdir(parents=True)


def _table_lines(summary: str) -> list[list[str]]:
    """The summary's trial rows, each error cut to its type (its text names the sweep's own path)."""
    rows = [ln.split(" | ") for ln in summary.splitlines() if ln.startswith("| ") and not ln.startswith("| trial")]
    return [[*cells[:-1], cells[-1].split(":")[0]] for cells in rows]


@pytest.mark.timeout(600)
def test_direct_scheduler_gives_the_outputs_of_tune(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.driver import run_sweep

    results = {}
    for scheduler in ("tune", "direct"):
        spec = _spec(tiny_model_dir, tmp_path, name=scheduler, scheduler=scheduler)
        broken = next(t.trial_id for t in expand_grid(spec) if t.scheme == "fp8_autoquant_full" and
                      t.effective_bits_target == 10.0)
        _block_manifest(spec, broken)
        res = run_sweep(spec, resume=True)  # the blocker made the trials dir; nothing in it is finished
        assert res["scheduler"] == scheduler
        results[scheduler] = (res, spec, broken)
    (tune, _, broken), (direct, direct_spec, _) = results["tune"], results["direct"]
    rows = {s: {r["trial_id"]: r for r in results[s][0]["rows"]} for s in results}
    assert sorted(rows["tune"]) == sorted(rows["direct"]) and len(rows["direct"]) == 6
    for tid, r in rows["direct"].items():
        t = rows["tune"][tid]
        assert r["status"] == t["status"], (tid, r.get("error"), t.get("error"))
        if r["status"] == "ok":  # the same search, the same choices
            assert json.loads(Path(r["manifest_path"]).read_text())["layers"] == \
                json.loads(Path(t["manifest_path"]).read_text())["layers"]
            assert (direct_spec.sweep_dir / "autoquant" / "trials" / tid / "result.json").is_file()
    # The trial that failed on its worker fails alone, recorded with its error; the unresolved ones too.
    assert rows["direct"][broken]["status"] == "error" and "Error" in rows["direct"][broken]["error"]
    assert sum(r["status"] == "ok" for r in rows["direct"].values()) == 3
    for res in (tune, direct):
        trials = load_trials(res["tables"])
        assert len(trials) == 6 and trials["trial_id"].is_unique
        assert set(trials.loc[trials["status"] == "error", "trial_id"]) == \
            {tid for tid, r in rows["direct"].items() if r["status"] != "ok"}
        assert len(load_layers(res["tables"])) == 3 * 29
    assert _table_lines(tune["summary"]) == _table_lines(direct["summary"])
    assert (direct_spec.sweep_dir / "summary.md").read_text() == direct["summary"]
    assert direct["stats"]["passes"] == tune["stats"]["passes"] and len(direct["stats"]["passes"]) == 2
    # The start, phase by phase: no Tune, so the first unit asks for work as soon as the pool answers.
    assert {"preflight", "connected", "launched", "first_unit_request", "first_lease", "first_result",
            "trials_done"} <= set(direct["phases"])
    assert list(direct["phases"].values()) == sorted(direct["phases"].values())


@pytest.mark.timeout(420)
def test_direct_scheduler_retries_the_unit_of_a_worker_killed_mid_trial(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.driver import run_sweep

    spec = _spec(tiny_model_dir, tmp_path, name="dfaults", scheduler="direct", max_calib_samples=48, max_failures=3,
                 schemes=("fp8_autoquant_top25", "fp8_autoquant_all_layers_fp8"))
    t, killed = kill_first_busy_worker("dfaults")
    res = run_sweep(spec)
    t.join(5)
    assert killed, "the test never caught a busy worker"
    assert res["scheduler"] == "direct"
    rows = res["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    trials = load_trials(res["tables"])
    assert len(trials) == 4 and trials["trial_id"].is_unique and (trials["status"] == "ok").all()
    assert len(load_layers(res["tables"])) == 4 * 29


@pytest.mark.timeout(600)
def test_direct_scheduler_interrupt_exits_130_with_the_resume_line_and_resumes(ray_cluster, tiny_model_dir,
                                                                                tmp_path):
    from auto_quantize_model.sweep.driver import run_sweep

    storage = tmp_path / "sweeps"
    argv = ["sweep", "--name", "dint", "--model-dir", str(tiny_model_dir), "--storage-path", str(storage),
            "--captions-path", "demo", "--schemes", "fp8_autoquant_top25,fp8_autoquant_all_layers_fp8",
            "--effective-bits", "15,13,11", "--max-calib-samples", "8", "--calib-seq-len", "32",
            "--scheduler", "direct", "--address", ray_cluster]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "auto_quantize_model.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    trials_dir = storage / "dint" / "autoquant" / "trials"
    deadline = time.time() + 400
    while time.time() < deadline and not list(trials_dir.glob("*/result.json")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-4000:]
    summary = (storage / "dint" / "summary.md").read_text()
    assert "Interrupted by SIGINT" in summary and "| interrupted |" in summary and "ERROR" not in summary
    assert "autoquant sweep --name dint" in err and "--resume" in err
    done = {p.parent.name for p in trials_dir.glob("*/result.json")}
    assert 1 <= len(done) < 6
    mtimes = {tid: (trials_dir / tid / "result.json").stat().st_mtime_ns for tid in done}
    spec = load_sweep_spec(None, {"name": "dint", "model_dir": str(tiny_model_dir), "storage_path": str(storage),
                                  "captions_path": "demo", "scheduler": "direct",
                                  "schemes": ("fp8_autoquant_top25", "fp8_autoquant_all_layers_fp8"),
                                  "effective_bits": (15.0, 13.0, 11.0), "max_calib_samples": 8, "calib_seq_len": 32})
    res = run_sweep(spec, resume=True)
    assert res["interrupted"] is None and res["scheduler"] == "direct"
    rows = {r["trial_id"]: r for r in res["rows"]}
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows.values())
    assert all(rows[tid].get("from_previous_run") for tid in done)
    for tid, mtime in mtimes.items():  # finished trials were not run again
        assert (trials_dir / tid / "result.json").stat().st_mtime_ns == mtime
    trials = load_trials(res["tables"])
    assert len(trials) == 6 and trials["trial_id"].is_unique


@pytest.mark.timeout(300)
def test_direct_scheduler_worker_that_fails_to_load_ends_the_sweep_with_one_line(ray_cluster, tiny_model_dir,
                                                                                   tmp_path):
    """As under Tune (test_sweep_start.py): the worker's reason in one line, no complete-looking summary."""
    import shutil

    from auto_quantize_model.errors import UserError
    from auto_quantize_model.sweep.driver import run_sweep

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    text = config.get("text_config", config)
    text["intermediate_size"] *= 2  # passes every preflight check; the weights then do not fit the model
    (bad / "config.json").write_text(json.dumps(config))
    spec = _spec(bad, tmp_path, name="dbad", scheduler="direct")
    t = time.monotonic()
    with pytest.raises(UserError, match="a model worker failed to start: "):
        run_sweep(spec)
    assert time.monotonic() - t < 120
    assert not (spec.sweep_dir / "summary.md").exists()
