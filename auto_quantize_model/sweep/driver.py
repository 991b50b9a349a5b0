"""Run a sweep: start (or join) Ray, start the pool and one model worker per GPU, schedule the trials on them.

Two schedulers run the same units with the same outputs: Tune (``tune_run.py``; it starts while the workers load)
and the driver's own threads (``direct.py``; no start at all), the default once every worker was attached loaded
from an earlier sweep (``scheduler = "auto"``). The sweep records when each step of its start happened
(``phases`` in its result and one log line).

Layout under ``<storage_path>/<name>/`` (Tune's experiment directory, under the Tune scheduler)::

    sweep_spec.json              the resolved settings
    autoquant/trials/<trial_id>/ manifest, report, restore artifact, evaluation.json, result.json
    autoquant/tables/            layers/ and trials/ Parquet tables (docs/tables.md)
    autoquant/cache/             ModelOpt search checkpoints, one per scoring key, shared by workers
    summary.md                   the end-of-sweep table
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any

import ray

from auto_quantize_model.actors.trial import Trial, write_trial_error
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_json, atomic_write_text
from auto_quantize_model.sweep.connect import Target, connect, given_address, resolve_target
from auto_quantize_model.sweep.lock import sweep_lock
from auto_quantize_model.sweep.progress import Progress
from auto_quantize_model.sweep.signals import SweepInterrupted, stop_on_signals
from auto_quantize_model.sweep.spec import (
    SweepSpec,
    assign_scoring_keys,
    expand_grid,
    group_units,
    keyed_units,
    provisional_identity,
)
from auto_quantize_model.sweep.trial import finished_result
from auto_quantize_model.sweep.workers import (  # noqa: F401 - start_workers, release_kept_workers: public here too
    NAMESPACE,
    BackgroundStart,
    WorkerLaunch,
    fit_to_cluster,
    launch_workers,
    release_kept_workers,
    start_workers,
)

log = logging.getLogger(__name__)
INTERRUPTED = "interrupted"
KEEP_NEEDS_CLUSTER = ("keeping workers needs a running Ray cluster (a local Ray started by the sweep stops with it): "
                      "pass --address or set RAY_ADDRESS, or drop --keep-workers")
# The sweep's start, in the order it happens (seconds from run_sweep's start; docs/benchmarks.md).
PHASES = ("preflight", "connected", "fitted", "launched", "units", "first_unit_request", "workers_ready",
          "first_lease", "first_result", "trials_done")


def _preflight(spec: SweepSpec, resume: bool) -> tuple[list[Trial], int]:
    """Every input check that needs no Ray and no model; returns the grid and the number of calibration captions.
    Refuses a grid with no runnable trial."""
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.preflight import (
        check_checkpoint_files,
        check_job_paths,
        probe_writable,
        read_checkpoint_config,
    )

    if spec.worker.keep and not (given_address(spec.address) or ray.is_initialized()):
        raise UserError(KEEP_NEEDS_CLUSTER)
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


def _target(spec: SweepSpec) -> Target | None:
    """The Ray this sweep runs on, checked with a deadline (``sweep/connect.py``); None: Ray is initialized."""
    if ray.is_initialized():
        return None
    return resolve_target(spec.address, needs_cluster=KEEP_NEEDS_CLUSTER if spec.worker.keep else None)


def run_sweep(spec: SweepSpec, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the result rows, pool statistics, paths and the start's phases.

    ``--resume`` never reads Tune's pickled experiment state: it starts a fresh run over the whole grid, and each
    trial that finds its own ``result.json`` (JSON, same settings) reports it without running.
    SIGINT/SIGTERM stop the sweep: the result has ``interrupted`` set (the signal's name) and unfinished rows
    have status ``interrupted``.
    """
    clock = {"start": time.time()}
    trials, num_captions = _preflight(spec, resume)
    target = _target(spec)
    clock["preflight"] = time.time()
    with sweep_lock(spec.sweep_dir):
        return _run_locked(spec, trials, num_captions, resume, target, clock)


def _run_locked(spec: SweepSpec, trials: list[Trial], num_captions: int, resume: bool, target: Target | None,
                clock: dict[str, float]) -> dict[str, Any]:
    sweep_dir = spec.sweep_dir
    ours = sweep_dir / "autoquant"
    context = {"trials": str(ours / "trials"), "tables": str(ours / "tables"), "cache": str(Path(spec.cache_dir).resolve() if spec.cache_dir else ours / "cache"),
               "namespace": NAMESPACE, "sweep": spec.name}
    # A trial that did not resolve fails alone, here: its row is written now and it never reaches a scheduler.
    for t in trials:
        if t.error is not None:
            write_trial_error(context["tables"], spec.name, t, t.error)
    progress = Progress(sum(t.error is None for t in trials))
    # No job-wide runtime_env: with one, Ray cannot hand the pool (and Tune's trials) a prestarted worker process,
    # and a repeat sweep on kept workers waits 1-2 s for a new one. The model workers set their own environment.
    started = connect(target, NAMESPACE) if target else False
    clock["connected"] = t0 = time.time()
    interrupted = None
    stats: dict[str, Any] = {}
    unit_errors: dict[str, str] = {}
    keyed: list[list[Trial]] = []  # the trials with the workers' real keys, once published
    scheduler = None
    n = 0
    try:
        with stop_on_signals() as stop:
            try:
                spec, n = fit_to_cluster(spec)
                clock["fitted"] = time.time()
                launch = launch_workers(spec, n)
                clock["launched"] = time.time()
                start: BackgroundStart | None = None
                start_error: Exception | None = None
                try:
                    context["pool"] = launch.pool_name
                    units = _units(spec, trials, num_captions, n)
                    clock["units"] = time.time()
                    start = BackgroundStart(launch, lambda identity: _publish(launch, units, trials, identity, keyed))
                    scheduler = _scheduler(spec, launch)
                    if resume:
                        log.info("resuming %s: finished trials report their result.json; the rest run", sweep_dir)
                    if scheduler == "direct":
                        from auto_quantize_model.sweep.direct import run_direct

                        unit_errors = run_direct(units, context, n=n, max_failures=spec.max_failures,
                                                 progress=progress, start_failed=start.failed)
                    else:
                        from auto_quantize_model.sweep.tune_run import run_with_tune

                        unit_errors = run_with_tune(units, context, name=spec.name, storage=str(sweep_dir.parent),
                                                    n=n, max_failures=spec.max_failures, progress=progress,
                                                    start_failed=start.failed, stop=stop)
                    clock["trials_done"] = time.time()
                    # Read once: a worker dying after this point (the sweep is done) must not fail the sweep.
                    start_error = start.error
                    if start_error is not None:
                        raise start_error
                    interrupted = stop.signal_name
                    stats = ray.get(launch.pool.stats.remote())
                finally:
                    launch.stop(spec.worker.keep, failed=start is None or start_error is not None)
                    if start is not None:
                        start.join(timeout=10)
            except SweepInterrupted:
                interrupted = stop.signal_name
    finally:
        if started:
            ray.shutdown()
    trials = keyed[0] if keyed else trials  # rows compare each trial with its result.json, keys included
    wall = time.time() - t0
    if interrupted:
        rows = _rows_after_interrupt(trials, progress.results, context["trials"])
    else:
        rows = _rows(trials, progress.results, unit_errors)
        _record_trial_errors(rows, trials, spec, context["tables"])
    summary = render_summary(spec, rows, stats, wall, n, interrupted=interrupted)
    atomic_write_text(sweep_dir / "summary.md", summary)
    phases = _phases(clock, stats, progress)
    log.info("sweep start (%s scheduler): %s", scheduler, ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
    return {"rows": rows, "stats": stats, "wall_seconds": wall, "num_workers": n, "sweep_dir": str(sweep_dir),
            "tables": context["tables"], "summary": summary, "interrupted": interrupted, "scheduler": scheduler,
            "phases": phases}


def _units(spec: SweepSpec, trials: list[Trial], num_captions: int, n: int) -> list[dict[str, Any]]:
    """The scheduler's units, grouped by keys from a stand-in identity so that they can start while the workers
    load; the real keys (autoquant/identity.py: the model and data the workers loaded) are published to the pool
    when the first worker is ready, before it takes any lease (:func:`_publish`)."""
    units = group_units([t for t in assign_scoring_keys(trials, provisional_identity(spec, num_captions))
                         if t.error is None], n)
    atomic_write_json(spec.sweep_dir / "sweep_spec.json", {**spec.to_dict(), "num_workers_used": n,
                                                           "num_trials": len(trials), "num_tune_trials": len(units)})
    log.info("%d trials in %d units (one per lease key, split to feed %d workers)", len(trials), len(units), n)
    return units


def _publish(launch: WorkerLaunch, units: list[dict[str, Any]], trials: list[Trial], identity: dict[str, Any],
             keyed: list[list[Trial]]) -> None:
    keyed.append(assign_scoring_keys(trials, identity))
    ray.get(launch.pool.publish.remote(keyed_units(units, keyed[0])))


def _scheduler(spec: SweepSpec, launch: WorkerLaunch) -> str:
    """``direct`` when asked, or (``auto``) when every worker was attached loaded from an earlier sweep: Tune's
    start would then be the longest wait before the first trial. Otherwise Tune, which starts while workers load."""
    if spec.scheduler != "auto":
        return spec.scheduler
    return "direct" if all(launch.kept) else "tune"


def _phases(clock: dict[str, float], stats: dict[str, Any], progress: Progress) -> dict[str, float]:
    """Seconds from run_sweep's start to each step of the sweep's start that happened (``PHASES``)."""
    marks = dict(clock)
    marks["first_unit_request"] = stats.get("first_unit_request_at")
    marks["workers_ready"] = max((stats.get("registered_at") or {}).values(), default=None)
    marks["first_lease"] = stats.get("first_lease_at")
    marks["first_result"] = progress.first_result_at
    return {k: round(marks[k] - clock["start"], 3) for k in PHASES if marks.get(k) is not None}


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
        if r.get("status") == "error" and r.get("unit_error"):
            write_trial_error(tables, spec.name, by_id[r["trial_id"]], str(r.get("error")))


def _rows(trials: list[Trial], seen: dict[str, dict[str, Any]], unit_errors: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trial: its own error if it did not resolve, else what it reported (``seen``, by our trial id),
    else its unit's error (failed past ``max_failures``), else missing."""
    rows = []
    for t in trials:
        if t.error is not None:
            rows.append(_unresolved_row(t))
            continue
        got = {k: v for k, v in seen.get(t.trial_id, {}).items() if k != "trial_id"}
        failed = {"status": "error", "error": unit_errors[t.trial_id], "unit_error": True} \
            if t.trial_id in unit_errors else {"status": "missing"}
        rows.append({**t.to_dict(), **(got if got.get("status") else failed)})
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
