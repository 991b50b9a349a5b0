"""Running a unit of the sweep's trials on a leased worker, for either scheduler (Tune or direct). No model, no
CUDA in this process.

A finished trial leaves ``result.json`` in its directory (written last, atomically); a trial that finds
one for the same settings reports it and does no work, so a resumed sweep reruns only what is
unfinished even if Tune's own experiment state lags behind.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from auto_quantize_model.actors.trial import Trial
from auto_quantize_model.io_utils import atomic_write_json

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"
Report = Callable[[dict[str, Any]], None]  # where a unit's results go: tune.report, or the direct scheduler


def finished_result(trials_dir: str | Path, trial: Trial) -> dict[str, Any] | None:
    """The stored result of a trial that already finished with these exact settings (resolved scheme and scoring
    fields included), else None."""
    path = Path(trials_dir) / trial.trial_id / RESULT_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return stored["result"] if stored.get("trial") == trial.to_dict() else None


def _wait_until_back(worker: Any, timeout: float = 900.0) -> None:
    """Wait while a dead worker restarts and reloads (elsewhere if its node is gone), so retries
    of this unit are not all spent on an actor that is still unavailable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(worker.info.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(1.0)


def run_unit(config: dict[str, Any], context: dict[str, str], report: Report,
             stop: threading.Event | None = None) -> None:
    """``config["unit"]`` names one group of the sweep's trials (``spec.group_units``); their scoring keys come from
    the pool (published once the first worker has loaded). They run in order on leased workers, one lease per
    lease key, each reported as it finishes; ``context`` names actors and dirs. ``stop`` (direct scheduler): set
    when the sweep is interrupted; no further trial starts."""
    unit_id = config["unit"]["unit_id"]
    pool = ray.get_actor(context["pool"], namespace=context["namespace"])
    published = ray.get(pool.unit_trials.remote(unit_id))
    if published is None:
        return  # the workers failed to start: the driver says why
    pending = []
    for trial in map(Trial.from_dict, published):
        done = finished_result(context["trials"], trial)
        if done is not None:
            report({**done, "from_previous_run": True})
        else:
            pending.append(trial)
    # Published in lease-key order: one lease per run of equal keys. A unit holds one lease key unless the real keys
    # split what the driver's stand-in grouping put together.
    runs = [list(g) for _, g in itertools.groupby(pending, key=lambda t: t.lease_key)]
    for i, run in enumerate(runs):
        if stop is not None and stop.is_set():
            return
        _run_leased(pool, f"{unit_id}#{i}", run, context, report, stop)


def _run_leased(pool: Any, owner: str, trials: list[Trial], context: dict[str, str], report: Report,
                stop: threading.Event | None) -> None:
    # The owner (unit id and run) names the lease: a retry of this unit (its process died) frees what the dead one
    # held, while the unit's next run does not take back a lease the worker is still handing back.
    lease = ray.get(pool.acquire.remote(owner, trials[0].lease_key))
    worker = ray.get_actor(lease["worker"], namespace=context["namespace"])
    for i, trial in enumerate(trials):
        if stop is not None and stop.is_set():
            return  # interrupted: the lease goes with the sweep's pool
        try:
            # The worker hands the lease back itself after the last trial, even if this process dies meanwhile.
            result = ray.get(worker.run_trial.remote(trial, lease, context, release=i == len(trials) - 1))
        except ray.exceptions.RayActorError:
            # The worker died mid-trial (Ray restarts it and it reloads); free the lease and let the scheduler retry
            # the unit (its finished trials report their result.json).
            ray.get(pool.worker_died.remote(lease))
            _wait_until_back(worker)
            raise
        if result["status"] == "ok":
            atomic_write_json(Path(context["trials"]) / trial.trial_id / RESULT_FILE,
                              {"trial": trial.to_dict(), "result": result})
        report({**result, "from_previous_run": False})
