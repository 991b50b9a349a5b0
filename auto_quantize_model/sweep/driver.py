"""Run a sweep: start (or join) Ray, start the pool and one model worker per GPU, let Tune schedule.

Layout under ``<storage_path>/<name>/`` (Tune's experiment directory)::

    sweep_spec.json              the resolved settings
    autoquant/trials/<trial_id>/ manifest, report, restore artifact, evaluation.json, result.json
    autoquant/tables/            layers/ and trials/ Parquet tables (docs/tables.md)
    autoquant/cache/             ModelOpt search checkpoints, one per scoring key, shared by workers
    summary.md                   the end-of-sweep table
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from auto_quantize_model.actors.trial import Trial, write_trial_error
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_json, atomic_write_text
from auto_quantize_model.sweep.lock import sweep_lock
from auto_quantize_model.sweep.signals import SweepInterrupted, stop_on_signals
from auto_quantize_model.sweep.spec import (
    SweepSpec,
    assign_scoring_keys,
    expand_grid,
    group_units,
    keyed_units,
    provisional_identity,
)
from auto_quantize_model.sweep.trial import finished_result, run_unit
from auto_quantize_model.sweep.workers import (  # noqa: F401 - start_workers, release_kept_workers: public here too
    NAMESPACE,
    TRIAL_RESOURCES,
    BackgroundStart,
    cluster_address,
    fit_to_cluster,
    launch_workers,
    release_kept_workers,
    start_workers,
)

log = logging.getLogger(__name__)
INTERRUPTED = "interrupted"


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


class ProgressLine(tune.Callback):
    """One log line per finished trial."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.results: dict[str, dict[str, Any]] = {}  # by our trial id: what an interrupted sweep still reports

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: D102
        self.done += 1
        if result.get("trial"):  # our trial id (Tune's own "trial_id" names the unit)
            self.results[result["trial"]] = dict(result)
        if result.get("status") != "ok":
            log.info("[%d/%d] %s FAILED: %s", self.done, self.total, result.get("trial"), result.get("error"))
            return
        extra = f", ppl {result['perplexity']:.4g}, KL {result['kl_mean']:.3g}" if result.get("perplexity") else ""
        log.info("[%d/%d] %s on %s: %d/%d quantized, %.3f bits (met %s), scores %s%s, %.1fs (%.0fs elapsed)",
                 self.done, self.total, result["trial"], result["worker"], result["num_quantized_layers"],
                 result["num_layers"], result["effective_bits_achieved"], result["budget_met"],
                 "reused" if result.get("from_previous_run") else ("computed" if result["scored"] else "reused"),
                 extra, result["time_trial"], time.perf_counter() - self.start)


def _connect(spec: SweepSpec) -> bool:
    """Join ``spec.address`` (or RAY_ADDRESS), else start a local Ray. Returns True if we started it."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}}
    address = cluster_address(spec.address)
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
        return False
    ray.init(namespace=NAMESPACE, runtime_env=env)
    return True


def _preflight(spec: SweepSpec, resume: bool) -> tuple[list[Trial], int]:
    """Every input check that needs no Ray and no model; returns the grid and the number of calibration captions.
    Refuses a grid with no runnable trial."""
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.models.loading import read_checkpoint_config
    from auto_quantize_model.preflight import check_checkpoint_files, check_job_paths, probe_writable

    if spec.worker.keep and not (cluster_address(spec.address) or ray.is_initialized()):
        raise UserError("keeping workers needs a running Ray cluster (a local Ray started by the sweep stops with "
                        "it): pass --address or set RAY_ADDRESS, or drop --keep-workers")
    check_job_paths(storage_path=spec.storage_path, model_dir=spec.model_dir)
    read_checkpoint_config(spec.model_dir)
    check_checkpoint_files(spec.model_dir)
    num_captions = len(read_captions(spec.captions_path).captions)
    if spec.eval_captions:
        read_captions(spec.eval_captions)
    trials = expand_grid(spec)
    reasons = [t.error for t in trials if t.error]
    if len(reasons) == len(trials):
        raise UserError(f"none of the {len(trials)} trials can run, e.g. {trials[0].trial_id}: {trials[0].error}")
    if reasons:
        log.warning("%d of %d trials cannot run and will be recorded as errors (first: %s)", len(reasons),
                    len(trials), reasons[0])
    probe_writable(spec.storage_path, "storage path", "--storage-path")
    if spec.sweep_dir.exists() and not spec.sweep_dir.is_dir():
        raise UserError(f"{spec.sweep_dir} is a file; choose another --name or --storage-path")
    ours = spec.sweep_dir / "autoquant"
    if not resume and (ours / "trials").exists():
        raise UserError(f"sweep {spec.sweep_dir} already exists; pass --resume to continue it or choose another --name")
    return trials, num_captions


def run_sweep(spec: SweepSpec, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the result rows, pool statistics and paths.

    ``--resume`` never reads Tune's pickled experiment state: it starts a fresh Tuner over the whole grid,
    and each trial that finds its own ``result.json`` (JSON, same settings) reports it without running.
    SIGINT/SIGTERM stop the sweep: the result has ``interrupted`` set (the signal's name) and unfinished rows
    have status ``interrupted``.
    """
    trials, num_captions = _preflight(spec, resume)
    sweep_dir = spec.sweep_dir
    with sweep_lock(sweep_dir):
        return _run_locked(spec, trials, num_captions, resume)


def _run_locked(spec: SweepSpec, trials: list[Trial], num_captions: int, resume: bool) -> dict[str, Any]:
    sweep_dir = spec.sweep_dir
    ours = sweep_dir / "autoquant"
    context = {"trials": str(ours / "trials"), "tables": str(ours / "tables"), "cache": str(Path(spec.cache_dir).resolve() if spec.cache_dir else ours / "cache"),
               "namespace": NAMESPACE, "sweep": spec.name}
    # A trial that did not resolve fails alone, here: its row is written now and it never reaches Tune.
    for t in trials:
        if t.error is not None:
            write_trial_error(context["tables"], spec.name, t, t.error)
    progress = ProgressLine(sum(t.error is None for t in trials))
    started = _connect(spec)
    t0 = time.perf_counter()
    interrupted = None
    stats: dict[str, Any] = {}
    grid = None
    n = 0
    try:
        with stop_on_signals() as stop:
            try:
                spec, n = fit_to_cluster(spec)
                launch = launch_workers(spec, n)
                start: BackgroundStart | None = None
                start_error: Exception | None = None
                try:
                    context["pool"] = launch.pool_name
                    # Tune trials group the sweep's trials by keys from a stand-in identity, so Tune can start while
                    # the workers load; the real keys (autoquant/identity.py: the model and data the workers loaded)
                    # are published to the pool when the first worker is ready, before it takes any lease.
                    units = group_units([t for t in assign_scoring_keys(trials, provisional_identity(spec, num_captions))
                                         if t.error is None], n)
                    atomic_write_json(sweep_dir / "sweep_spec.json", {**spec.to_dict(), "num_workers_used": n,
                                                                      "num_trials": len(trials),
                                                                      "num_tune_trials": len(units)})
                    log.info("%d trials in %d Tune trials (one per lease key, split to feed %d workers)",
                             len(trials), len(units), n)
                    keyed: list[list[Trial]] = []

                    def publish(identity: dict[str, Any]) -> None:
                        keyed.append(assign_scoring_keys(trials, identity))
                        ray.get(launch.pool.publish.remote(keyed_units(units, keyed[0])))

                    start = BackgroundStart(launch, publish)
                    _START_FAILED[launch.pool_name] = start.failed
                    trainable = tune.with_resources(tune.with_parameters(run_unit, context=context), TRIAL_RESOURCES)
                    run_config = tune.RunConfig(name=spec.name, storage_path=str(sweep_dir.parent), verbose=0,
                                                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                                callbacks=[progress], stop=_StopOnStartFailure(launch.pool_name))
                    if resume:
                        log.info("resuming %s: finished trials report their result.json; the rest run", sweep_dir)
                    param_space = {"unit": tune.grid_search([{"unit_id": u["unit_id"],
                                                              "trial_ids": [t["trial_id"] for t in u["trials"]]}
                                                             for u in units])}
                    tuner = tune.Tuner(
                        trainable, param_space=param_space, run_config=run_config,
                        # Trials are thin lease-and-wait functions: reusing their actors saves a process start each.
                        tune_config=tune.TuneConfig(max_concurrent_trials=n, reuse_actors=True,
                                                    trial_dirname_creator=lambda t: t.config["unit"]["unit_id"],
                                                    trial_name_creator=lambda t: t.config["unit"]["unit_id"]),
                    )
                    stop.in_fit = True
                    grid = tuner.fit()
                    stop.in_fit = False
                    # Read once: a worker dying after this point (the sweep is done) must not fail the sweep.
                    start_error = start.error
                    if start_error is not None:
                        raise start_error
                    trials = keyed[0] if keyed else trials
                    interrupted = stop.signal_name
                    stats = ray.get(launch.pool.stats.remote())
                finally:
                    _START_FAILED.pop(launch.pool_name, None)
                    launch.stop(spec.worker.keep, failed=start is None or start_error is not None)
                    if start is not None:
                        start.join(timeout=10)
            except SweepInterrupted:
                interrupted = stop.signal_name
    finally:
        if started:
            ray.shutdown()
    wall = time.perf_counter() - t0
    if interrupted:
        rows = _rows_after_interrupt(trials, progress.results, context["trials"])
    else:
        rows = _rows(grid, trials, progress.results)
        _record_trial_errors(rows, trials, spec, context["tables"])
    summary = render_summary(spec, rows, stats, wall, n, interrupted=interrupted)
    atomic_write_text(sweep_dir / "summary.md", summary)
    return {"rows": rows, "stats": stats, "wall_seconds": wall, "num_workers": n, "sweep_dir": str(sweep_dir),
            "tables": context["tables"], "summary": summary, "interrupted": interrupted}


def _unresolved_row(t: Trial) -> dict[str, Any]:
    return {**t.to_dict(), "status": "error"}  # its error is the trial's own


def _rows_after_interrupt(trials: list[Trial], seen: dict[str, dict[str, Any]],
                          trials_dir: str) -> list[dict[str, Any]]:
    """Rows from what finished (reported results, result.json markers); everything else is ``interrupted``."""
    rows = []
    for t in trials:
        if t.error is not None:
            rows.append(_unresolved_row(t))
            continue
        done = finished_result(trials_dir, t)
        got = {k: v for k, v in (done or seen.get(t.trial_id) or {}).items() if k != "trial_id"}
        rows.append({**t.to_dict(), **(got if got.get("status") else {"status": INTERRUPTED})})
    return rows


def _record_trial_errors(rows: list[dict[str, Any]], trials: list[Trial], spec: SweepSpec, tables: str) -> None:
    """A trial that failed in Tune (its worker died past max_failures) still gets its row in the tables."""
    by_id = {t.trial_id: t for t in trials}
    for r in rows:
        if r.get("status") == "error" and r.get("tune_error"):
            write_trial_error(tables, spec.name, by_id[r["trial_id"]], str(r.get("error")))


def _rows(grid: Any, trials: list[Trial], seen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial: its own error if it did not resolve, else what it reported (``seen``, by our trial id),
    else its unit's Tune error, else missing."""
    unit_error = {}
    for res in grid:
        if res.error is not None:
            msg = str(res.error).strip().splitlines()[-1][:300]
            for trial_id in (res.config or {}).get("unit", {}).get("trial_ids", []):
                unit_error[trial_id] = {"status": "error", "error": msg, "tune_error": True}
    rows = []
    for t in trials:
        if t.error is not None:
            rows.append(_unresolved_row(t))
            continue
        got = {k: v for k, v in seen.get(t.trial_id, {}).items() if k != "trial_id"}
        rows.append({**t.to_dict(), **(got if got.get("status") else unit_error.get(t.trial_id, {"status": "missing"}))})
    return rows


def render_summary(spec: SweepSpec, rows: list[dict[str, Any]], stats: dict[str, Any], wall: float, n: int,
                   interrupted: str | None = None) -> str:
    """The end-of-sweep table (printed and saved as summary.md)."""
    ok = sum(r.get("status") == "ok" for r in rows)
    lines = [f"# Sweep {spec.name}", ""]
    if interrupted:
        left = sum(r.get("status") == INTERRUPTED for r in rows)
        lines += [f"**Interrupted by {interrupted}**: {left} trial(s) did not finish; continue with `--resume`.", ""]
    lines += [f"{len(rows)} trials ({ok} ok) on {n} worker(s) in {wall:.1f} s; scoring passes per key: "
              f"{stats.get('passes')}; reuses: {stats.get('reuses')}", "",
              # Two bits bases, one per column: the budget's (the target's basis: the layers the search's budget
              # counts) and every LM Linear's (excluded layers such as a BF16 lm_head at 16: what ships).
              "| trial | scheme | bits target | achieved (budget) | all LM Linears | quantized layers | met | scores | ppl "
              "| KL mean | exportable | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # A trial that stands for several scheme names (same resolved experiment) is reported under all.
        scheme = " = ".join([r["scheme"], *r.get("equivalent_schemes", [])])
        if r.get("status") == INTERRUPTED:
            lines.append(f"| {r['trial_id']} | {scheme} | {r['effective_bits_target']:g} | - | - | - | - | - | - | - | - | "
                         f"{INTERRUPTED} |")
            continue
        if r.get("status") != "ok":
            lines.append(f"| {r['trial_id']} | {scheme} | {r['effective_bits_target']:g} | - | - | - | - | - | - | - | - | "
                         f"ERROR: {str(r.get('error', ''))[:120]} |")
            continue
        ppl = f"{r['perplexity']:.4g}" if r.get("perplexity") is not None else "-"
        kl = f"{r['kl_mean']:.3g}" if r.get("kl_mean") is not None else "-"
        every = f"{r['effective_bits_all_layers']:.3f}" if r.get("effective_bits_all_layers") is not None else "-"
        export = "-" if r.get("exportable") is None else ("yes" if r["exportable"] else "no")
        scores = "previous run" if r.get("from_previous_run") else ("computed" if r["scored"] else "reused")
        lines.append(f"| {r['trial_id']} | {scheme} | {r['effective_bits_target']:g} | {r['effective_bits_achieved']:.3f} | "
                     f"{every} | {r['num_quantized_layers']}/{r['num_layers']} | {r['budget_met']} | {scores} | {ppl} | "
                     f"{kl} | {export} | ok |")
    if ok:
        lines += ["", f"Ship a trial: `autoquant ship {shlex.quote(str(spec.sweep_dir))} --trial ID --output-dir DIR` "
                  "(or a rule: `--max-bits`, `--max-kl`, `--max-ppl-increase`, `--min-prefill-speedup`); "
                  f"`autoquant analyze {shlex.quote(str(spec.sweep_dir))} --output-dir DIR` names the trial to ship "
                  "under standard rules."]
    return "\n".join(lines) + "\n"
