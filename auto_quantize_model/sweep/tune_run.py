"""The Tune scheduler: one Tune trial per unit of the sweep's trials, at most one per worker at a time.

Tune starts while the workers load (its start is hidden behind the load); its trials are thin processes that lease
a worker from the pool and wait. A unit whose process fails is retried by Tune (``max_failures``).
"""

from __future__ import annotations

import threading
from typing import Any

from ray import tune

from auto_quantize_model.sweep.progress import Progress
from auto_quantize_model.sweep.signals import Stop
from auto_quantize_model.sweep.trial import run_unit
from auto_quantize_model.sweep.workers import TRIAL_RESOURCES

# Start failures by pool name: Tune pickles its run config (stopper included), and an Event does not pickle.
_START_FAILED: dict[str, threading.Event] = {}


class _StopOnStartFailure(tune.Stopper):
    """Ends the Tune experiment at once when the workers fail to start (the driver then raises why)."""

    def __init__(self, pool_name: str) -> None:
        self.pool_name = pool_name

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        failed = _START_FAILED.get(self.pool_name)
        return failed is not None and failed.is_set()


class _Reported(tune.Callback):
    """Hands every reported result to the sweep's :class:`Progress`."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: D102
        self.progress.record(result)


def _unit_trainable(config: dict[str, Any], context: dict[str, str]) -> None:
    """Tune function trainable: run the unit, reporting each trial to Tune."""
    run_unit(config, context, tune.report)


def run_with_tune(units: list[dict[str, Any]], context: dict[str, str], *, name: str, storage: str, n: int,
                  max_failures: int, progress: Progress, start_failed: threading.Event, stop: Stop) -> dict[str, str]:
    """Run every unit under Tune; returns the error of each trial whose unit failed past ``max_failures``."""
    pool_name = context["pool"]
    _START_FAILED[pool_name] = start_failed
    try:
        trainable = tune.with_resources(tune.with_parameters(_unit_trainable, context=context), TRIAL_RESOURCES)
        run_config = tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                    failure_config=tune.FailureConfig(max_failures=max_failures),
                                    callbacks=[_Reported(progress)], stop=_StopOnStartFailure(pool_name))
        param_space = {"unit": tune.grid_search([{"unit_id": u["unit_id"],
                                                  "trial_ids": [t["trial_id"] for t in u["trials"]]} for u in units])}
        tuner = tune.Tuner(
            trainable, param_space=param_space, run_config=run_config,
            # Trials are thin lease-and-wait functions: reusing their actors saves a process start each.
            tune_config=tune.TuneConfig(max_concurrent_trials=n, reuse_actors=True,
                                        trial_dirname_creator=lambda t: t.config["unit"]["unit_id"],
                                        trial_name_creator=lambda t: t.config["unit"]["unit_id"]),
        )
        stop.in_fit = True
        try:
            grid = tuner.fit()
        finally:
            stop.in_fit = False
    finally:
        _START_FAILED.pop(pool_name, None)
    errors = {}
    for res in grid:
        if res.error is not None:
            msg = str(res.error).strip().splitlines()[-1][:300]
            for trial_id in (res.config or {}).get("unit", {}).get("trial_ids", []):
                errors[trial_id] = msg
    return errors
