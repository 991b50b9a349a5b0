"""The sweep starts Tune while its workers load (issue 11). On the old code the driver waited for every worker to
load before it built the Tune trials, so no Tune trial could ask for work before a worker was ready (and the pool
kept no timings: ``first_unit_request_at`` does not exist there)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from auto_quantize_model.actors.trial import Trial
from auto_quantize_model.errors import UserError
from auto_quantize_model.sweep.spec import (
    assign_scoring_keys,
    expand_grid,
    group_units,
    keyed_units,
    load_sweep_spec,
    provisional_identity,
)


def _spec(tiny_model_dir, tmp_path, **kw):
    base = {"name": "overlap", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path / "sweeps"),
            "captions_path": "demo", "max_calib_samples": 16, "batch_size": 4, "calib_seq_len": 32,
            "schemes": ("fp8_autoquant_full", "int4w_fp8_autoquant_mix", "fp8_autoquant_all_layers_fp8"),
            "effective_bits": (12.0, 10.0), "num_workers": 1, "worker": {"num_gpus": 0}}
    return load_sweep_spec(None, {**base, **kw})


@pytest.mark.timeout(600)
def test_tune_asks_for_work_before_the_worker_has_loaded(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.driver import run_sweep

    spec = _spec(tiny_model_dir, tmp_path)
    res = run_sweep(spec)
    assert all(r["status"] == "ok" for r in res["rows"]), res["rows"]
    stats = res["stats"]
    (ready,) = stats["registered_at"].values()
    assert stats["first_unit_request_at"] < ready  # a Tune trial was running while the worker still loaded
    # The trials ran under the keys of the data the worker loaded, not the driver's stand-in: the shared pass of
    # the two format sets and the all-layers search are the only scoring passes, as in a sweep that waited.
    assert sorted(stats["passes"].values()) == [1, 1]
    identity = res["rows"][0]["score_cache_key"]
    assert identity and all(r["score_cache_key"] for r in res["rows"])
    # Every row's scoring key is the one its manifest recorded, computed by the worker from what it loaded.
    for r in res["rows"]:
        manifest = json.loads(open(r["manifest_path"]).read())
        assert manifest["score_cache"]["key"] == r["score_cache_key"]


@pytest.mark.timeout(300)
def test_worker_that_fails_to_load_ends_the_sweep_with_one_line(ray_cluster, tiny_model_dir, tmp_path):
    """The failure now arrives while Tune runs: Tune stops at once, the driver raises the worker's reason, and no
    summary that looks complete is written; the pool and the worker are gone."""
    import ray
    from ray.util import list_named_actors

    from auto_quantize_model.sweep.driver import run_sweep

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    text = config.get("text_config", config)
    text["intermediate_size"] *= 2  # passes every preflight check; the weights then do not fit the model
    (bad / "config.json").write_text(json.dumps(config))
    spec = _spec(bad, tmp_path, name="badload")
    t = time.monotonic()
    with pytest.raises(UserError, match="a model worker failed to start: the weights of .* do not match its config"):
        run_sweep(spec)
    assert time.monotonic() - t < 120
    assert not (spec.sweep_dir / "summary.md").exists()
    time.sleep(1)
    assert not [a for a in list_named_actors(all_namespaces=True) if "badload" in a["name"]]
    assert ray.is_initialized()


def test_units_from_the_stand_in_identity_get_the_workers_keys(tiny_model_dir, tmp_path):
    """Grouping with the driver's stand-in identity, publishing with the real one: every trial gets the key a
    sweep that waited for its workers would have given it, each unit in lease-key order."""
    spec = _spec(tiny_model_dir, tmp_path)
    trials = expand_grid(spec)
    real = {"weights_fingerprint": "w" * 8, "config_hash": "c", "dtype": "float32", "scope": "language_model",
            "calibration_hash": "t" * 8, "num_batches": 4, "batch_size": 4}
    stand_in = provisional_identity(spec, num_captions=13)  # 13 captions, 16 asked for: 4 batches of 4, as loaded
    assert stand_in["num_batches"] == real["num_batches"]
    units = group_units([t for t in assign_scoring_keys(trials, stand_in) if t.error is None], 1)
    waited = {t.trial_id: t for t in assign_scoring_keys(trials, real)}
    # With the right batch count the stand-in groups exactly as the real keys do: one Tune trial per lease key.
    real_units = group_units([t for t in waited.values() if t.error is None], 1)
    assert sorted(sorted(t["trial_id"] for t in u["trials"]) for u in units) == \
        sorted(sorted(t["trial_id"] for t in u["trials"]) for u in real_units)
    published = keyed_units(units, list(waited.values()))
    assert sorted(published) == sorted(u["unit_id"] for u in units)
    seen = []
    for unit_trials in published.values():
        got = [Trial.from_dict(d) for d in unit_trials]
        assert [(t.lease_key, t.scoring_key) for t in got] == sorted((t.lease_key, t.scoring_key) for t in got)
        for t in got:
            assert t == waited[t.trial_id]
            seen.append(t.trial_id)
    assert sorted(seen) == sorted(t.trial_id for t in trials if t.error is None)


_DRIVER_START = """
import sys
from auto_quantize_model.sweep import driver
from auto_quantize_model.sweep.spec import load_sweep_spec
spec = load_sweep_spec(None, {"name": "x", "model_dir": sys.argv[1], "captions_path": "demo",
    "storage_path": sys.argv[2], "effective_bits": [12.0, 10.0],
    "schemes": ["fp8_autoquant_full", "int4w_fp8_autoquant_mix", "fp8_autoquant_all_layers_fp8"],
    "worker": {"num_gpus": 0}})
trials, _ = driver._preflight(spec, False)
if hasattr(driver, "_target"):  # the cluster check (the old driver had none before connecting)
    driver._target(spec)
print("HEAVY", [m for m in ("torch", "ray.tune", "transformers", "modelopt") if m in sys.modules])
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_driver_start_imports_neither_torch_nor_tune(tiny_model_dir, tmp_path):
    """Everything the driver does before it connects (imports, preflight, the cluster check) imports no torch and no
    Tune: on the old code the preflight imported torch (models/loading.py, for reading config.json) and the driver
    module imported Tune, seconds before the workers could launch. (The second run reads the format facts the first
    wrote: the first may import ModelOpt to compute them.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AUTOQUANT_FORMAT_CACHE": str(tmp_path / "facts.json"), "RAY_ADDRESS": "",
           "RAY_TMPDIR": str(tmp_path / "ray")}
    runs = [subprocess.run([sys.executable, "-c", _DRIVER_START, str(tiny_model_dir), str(tmp_path / "sweeps")],
                           capture_output=True, text=True, env=env, timeout=240) for _ in range(2)]
    assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
    assert runs[-1].stdout.strip().splitlines()[-1] == "HEAVY []", runs[-1].stdout
