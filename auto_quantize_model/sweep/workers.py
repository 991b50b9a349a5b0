"""The sweep's model workers on the cluster: how many fit, starting them, and kept workers across sweeps.

A sweep starts one lease pool and ``n`` model workers (``actors/``). With ``[worker] keep`` on a running cluster the
workers are detached actors named by their load signature (``WorkerSpec.load_signature``: settings, code, library
versions); the next sweep with the same signature attaches them to its own pool instead of loading again, and
``autoquant release-workers`` stops them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from auto_quantize_model.errors import UserError
from auto_quantize_model.sweep.spec import SweepSpec

log = logging.getLogger(__name__)
NAMESPACE = "autoquant"
# Trials only lease and wait; they need a sliver of a CPU (Tune refuses 0) and no GPU.
TRIAL_RESOURCES = {"cpu": 0.01}
ROOM_WAIT_S = 10.0  # how long to wait for resources a killed worker is releasing before refusing a sweep


def fit_to_cluster(spec: SweepSpec) -> tuple[SweepSpec, int]:
    """Workers per GPU by default; on a cluster without GPUs, CPU workers (a GPU request would hang)."""
    import dataclasses

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if spec.worker.num_gpus > 0 and gpus == 0:
        if spec.measure:
            raise UserError("measure times FP8 kernels on GPUs, but the Ray cluster has none: run on a GPU cluster "
                            "or drop --measure")
        log.warning("the Ray cluster has no GPUs: model workers run on CPU")
        spec = dataclasses.replace(spec, worker=dataclasses.replace(spec.worker, num_gpus=0))
    n = spec.num_workers or (max(1, int(gpus // spec.worker.num_gpus)) if spec.worker.num_gpus > 0 else 1)
    # Every concurrent trial needs its CPU sliver next to the workers, or trials stay PENDING forever.
    cpus = float(ray.cluster_resources().get("CPU", 0))
    room = (cpus - n * TRIAL_RESOURCES["cpu"] - 0.001) / n
    if room <= 0:
        raise UserError(f"{n} workers do not fit on a cluster with {cpus:g} CPUs; use fewer --num-workers")
    if spec.worker.num_cpus > room:
        log.warning("worker num_cpus %.2f -> %.2f so that %d trials can run beside %d workers on %g CPUs",
                    spec.worker.num_cpus, room, n, n, cpus)
        spec = dataclasses.replace(spec, worker=dataclasses.replace(spec.worker, num_cpus=room))
    if spec.worker.num_threads == 0:
        # Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 by default): the worker's host-side work (ModelOpt's
        # per-module hooks, score sums, checkpoint pickling) then runs on one thread. Share the CPUs out instead.
        threads = max(1, int(cpus // n))
        spec = dataclasses.replace(spec, worker=dataclasses.replace(spec.worker, num_threads=threads))
    return spec, n


KEEP_PREFIX = "autoquant-keep-"


def _kept_worker_names() -> list[str]:
    """Names of kept (detached) model workers on the cluster, from any earlier sweep."""
    from ray.util import list_named_actors

    return sorted(a["name"] for a in list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(KEEP_PREFIX))


def _attach_kept(spec: SweepSpec, name: str, pool_name: str, signature: str) -> Any | None:
    """The kept worker ``name`` attached to this sweep's pool, or None if there is none (a dead or stale one is
    stopped, so that a new one can take its place)."""
    try:
        worker = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None
    try:
        # attach runs beside a trial (its own concurrency group), so a slow answer means a sick worker, not a busy one.
        ray.get(worker.attach.remote(spec.to_dict(), pool_name, NAMESPACE, signature), timeout=120)
    except ray.exceptions.GetTimeoutError as exc:
        raise UserError(f"the kept worker {name} did not answer in 120 s; free it with `autoquant release-workers "
                        "--force` or drop --keep-workers") from exc
    except ray.exceptions.RayError as exc:
        from auto_quantize_model.actors.worker import StaleWorkerError, WorkerBusyError

        cause = getattr(exc, "cause", None)  # what attach raised, for a RayTaskError
        if isinstance(cause, WorkerBusyError):
            raise UserError(f"the kept worker {name} for these settings is serving another sweep; wait for it to end "
                            "or drop --keep-workers") from exc
        stale = isinstance(cause, StaleWorkerError)
        if not stale and not isinstance(exc, ray.exceptions.RayActorError):
            raise
        why = "holds other code, settings or input files" if stale else "is dead"
        log.warning("kept worker %s %s; starting a new one", name, why)
        ray.kill(worker, no_restart=True)
        return None
    return worker


def _check_room(spec: SweepSpec, new_workers: int, n: int, others: list[str]) -> None:
    """Refuse, in one line, a sweep that kept workers of other settings would leave waiting forever: its new
    workers need their GPUs and CPUs, and its ``n`` concurrent Tune trials a CPU sliver each."""
    if not others:
        return
    need = {"GPU": new_workers * spec.worker.num_gpus,
            "CPU": new_workers * spec.worker.num_cpus + n * TRIAL_RESOURCES["cpu"]}
    # Resources of a worker killed a moment ago (a stale kept one replaced above) show as free a little later.
    deadline = time.monotonic() + ROOM_WAIT_S
    while True:
        free = ray.available_resources()
        short = [(r, float(free.get(r, 0)), amount) for r, amount in need.items()
                 if amount > float(free.get(r, 0)) + 1e-6]
        if not short or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if short:
        resource, have, amount = short[0]
        raise UserError(f"{len(others)} kept worker(s) of other settings or code hold the cluster's "
                        f"{resource}s ({have:g} free, {amount:g} needed): free them with `autoquant "
                        "release-workers --address ...`")


@dataclass
class WorkerLaunch:
    """A sweep's lease pool and model workers: started, not necessarily loaded yet (:func:`await_workers`)."""

    pool: Any
    pool_name: str
    workers: list[Any]
    kept: list[bool]  # attached from an earlier sweep: loaded already
    created: list[Any] = field(default_factory=list)  # started by this sweep: stopped again if the start fails

    def stop(self, keep: bool, failed: bool = False) -> None:
        """End of the sweep: kept workers detach (they stay loaded for the next sweep), others are killed; after a
        failed start the workers this sweep created are killed even when kept. The pool goes last."""
        if keep and not failed:
            # A kept worker still loading (the sweep ended or was interrupted first) answers only once loaded; it
            # needs no detach anyway: its pool is gone, so the next sweep may attach it. Wait briefly, never block.
            refs = [w.detach.remote() for w in self.workers]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
            if len(done) < len(refs):
                log.info("%d kept worker(s) still loading; they stay on the cluster for the next sweep",
                         len(refs) - len(done))
        else:
            for w in (self.created if keep else self.workers):
                ray.kill(w, no_restart=True)
        ray.kill(self.pool)


def launch_workers(spec: SweepSpec, n: int) -> WorkerLaunch:
    """Pool plus ``n`` named workers, returned while new workers still import and load (nothing waits here).

    With ``[worker] keep`` the workers are detached actors named by their load settings: those an earlier sweep
    left on the cluster are attached to this sweep's pool instead of loading again; missing ones are started.
    """
    from auto_quantize_model.actors.pool import WorkerPool

    tag = f"{spec.name}-{os.getpid()}-{int(time.time())}"
    pool_name = f"autoquant-pool-{tag}"
    # The pool holds the only lease state: pin it to the driver's node, so losing any other node never loses it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # cast: a Ray actor class gets .options from @ray.remote, which the type checker cannot see
    pool = cast(Any, WorkerPool).options(name=pool_name, namespace=NAMESPACE, scheduling_strategy=here).remote()
    launch = WorkerLaunch(pool, pool_name, [], [])
    try:
        _launch(spec, n, tag, launch)
    except BaseException:
        launch.stop(spec.worker.keep, failed=True)
        raise
    return launch


def _launch(spec: SweepSpec, n: int, tag: str, launch: WorkerLaunch) -> None:
    from auto_quantize_model.actors.settings import WorkerSpec
    from auto_quantize_model.actors.worker import ModelWorker

    # Set before the worker process imports torch (Ray leaves an explicit OMP_NUM_THREADS alone).
    threads = str(spec.worker.num_threads or 1)
    # Fixed thread teams: with dynamic teams the OpenMP/MKL runtime may run a parallel region on fewer threads when
    # the host is busy (Tune starts beside a loading worker), which changes CPU reduction order and thus logits, and
    # the pristine-copy check compares logits bit for bit.
    # TOKENIZERS_PARALLELISM: the worker tokenizes its data once and forks nothing; without it the tokenizers library
    # warns about forking after parallel use.
    threads_env = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_DYNAMIC": "FALSE",
                                "MKL_DYNAMIC": "FALSE", "TOKENIZERS_PARALLELISM": "false"}}
    keep = spec.worker.keep
    signature = WorkerSpec.from_sweep_dict(spec.to_dict()).load_signature()
    if keep:
        names = [f"{KEEP_PREFIX}{signature}-{i}" for i in range(n)]
    else:
        names = [f"autoquant-worker-{tag}-{i}" for i in range(n)]
    attached = {name: _attach_kept(spec, name, launch.pool_name, signature) for name in names} if keep else {}
    others = [k for k in _kept_worker_names() if k not in names]
    if others:
        log.warning("%d kept worker(s) of other settings or code are on this cluster (%s); free them with "
                    "`autoquant release-workers`", len(others), ", ".join(others))
    _check_room(spec, sum(attached.get(name) is None for name in names), n, others)
    for name in names:
        worker = attached.get(name)
        launch.kept.append(worker is not None)
        if worker is None:
            try:
                worker = cast(Any, ModelWorker).options(
                    name=name, namespace=NAMESPACE, num_gpus=spec.worker.num_gpus, num_cpus=spec.worker.num_cpus,
                    runtime_env=threads_env, lifetime="detached" if keep else None,
                ).remote(spec.to_dict(), name, launch.pool_name, NAMESPACE)
            except ValueError as exc:  # the name is taken: another driver started this kept worker a moment ago
                raise UserError(f"another sweep is starting the kept worker {name} right now; run this sweep again "
                                "once it has started") from exc
            launch.created.append(worker)
        launch.workers.append(worker)


def await_workers(launch: WorkerLaunch, on_first: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Wait for the workers to load; each joins the lease pool as soon as it is ready. Returns their common model and
    data identity (``autoquant/identity.py``).

    ``on_first(identity)`` runs once, when the first worker is ready and before it takes any lease (the driver
    publishes the trials' scoring keys there). A worker that fails to load, or loaded other weights or data than
    the first, is refused with a ``UserError``.
    """
    from auto_quantize_model.timing import format_steps

    pending = {w.info.remote(): (w, kept) for w, kept in zip(launch.workers, launch.kept, strict=True)}
    identity: dict[str, Any] | None = None
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        worker, was_kept = pending.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            cause = getattr(exc, "cause", None) or exc
            last = str(cause).strip().splitlines()[-1].removeprefix("auto_quantize_model.errors.UserError: ")
            raise UserError(f"a model worker failed to start: {last}") from exc
        mine = ray.get(worker.identity.remote())
        if identity is None:
            identity = mine
            if on_first is not None:
                on_first(identity)
        elif mine != identity:
            raise UserError("model workers loaded different weights or data (their identities differ); give every "
                            "node the same --model-dir and captions")
        ray.get(launch.pool.register.remote(info["name"], info["warm_keys"]))
        how = f"kept from an earlier sweep (serving its sweep {info['sweeps_served']})" if was_kept else \
            f"load {info['load_seconds']:.1f}s ({format_steps(info.get('load_phases', {}))})"
        log.info("worker %s: %s (CUDA_VISIBLE_DEVICES=%s), %s, pristine on %s, %d host threads", info["name"],
                 info["device"], info["cuda_visible_devices"], how, info["pristine_on"], info["num_threads"])
    assert identity is not None  # at least one worker
    return identity


class BackgroundStart:
    """:func:`await_workers` on a thread, so Tune sets up while the workers import and load.

    A failure is kept for the driver (``error``) and announced to the pool, which releases every Tune trial waiting
    for its unit; ``failed`` lets a Tune stopper end the experiment at once.
    """

    def __init__(self, launch: WorkerLaunch, on_first: Callable[[dict[str, Any]], None]) -> None:
        self.launch, self.on_first = launch, on_first
        self.identity: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.failed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoquant-worker-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.identity = await_workers(self.launch, self.on_first)
        except Exception as exc:  # noqa: BLE001 - handed to the driver's thread, which raises it
            if not isinstance(exc, UserError):  # a Ray error's text spans lines: keep its last one
                last = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
                exc = UserError(f"the sweep's workers did not start: {last}")
            self.error = exc
            self.failed.set()
            try:
                self.launch.pool.fail.remote(str(exc))
            except Exception as late:  # noqa: BLE001 - the sweep has already ended and stopped its pool (or Ray)
                log.debug("worker start failed after the sweep ended: %s", late)

    def join(self, timeout: float) -> None:
        """Wait for the thread (it ends once every worker is ready or gone) before Ray shuts down."""
        self._thread.join(timeout)


def start_workers(spec: SweepSpec, n: int) -> tuple[Any, list[Any], str, dict[str, Any]]:
    """:func:`launch_workers` and :func:`await_workers` in one blocking call: the pool, the loaded workers, the
    pool's name and their identity. Stops what it started if any worker fails to load."""
    launch = launch_workers(spec, n)
    try:
        identity = await_workers(launch)
    except BaseException:
        launch.stop(spec.worker.keep, failed=True)
        raise
    return launch.pool, launch.workers, launch.pool_name, identity


def release_kept_workers(address: str | None, force: bool = False) -> tuple[list[str], list[str]]:
    """Kill the kept model workers on the cluster at ``address`` (or RAY_ADDRESS) that no sweep is using (with
    ``force``, all of them). Returns the names released and the names left serving a running sweep."""
    from auto_quantize_model.sweep.connect import connect, resolve_target

    if not ray.is_initialized():
        # Checked with a deadline: a dead or wrong address is one line, not Ray's endless retries.
        target = resolve_target(address, needs_cluster="release-workers needs the running cluster: pass --address "
                                                       "or set RAY_ADDRESS")
        connect(target, NAMESPACE, log_to_driver=False)
    released, busy = [], []
    for name in _kept_worker_names():
        try:
            worker = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # gone meanwhile
            continue
        try:
            in_use = not force and ray.get(worker.busy.remote(NAMESPACE), timeout=30)
        except ray.exceptions.RayError:  # dead or not answering: nothing to protect
            in_use = False
        if in_use:
            busy.append(name)
            continue
        ray.kill(worker, no_restart=True)
        released.append(name)
    return released, busy
