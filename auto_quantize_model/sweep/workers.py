"""The sweep's model workers on the cluster: how many fit, starting them, and kept workers across sweeps.

A sweep starts one lease pool and ``n`` model workers (``actors/``). With ``[worker] keep`` on a running cluster the
workers are detached actors named by their load signature (``WorkerSpec.load_signature``: settings, code, library
versions); the next sweep with the same signature attaches them to its own pool instead of loading again, and
``autoquant release-workers`` stops them.
"""

from __future__ import annotations

import logging
import os
import time
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


def cluster_address(address: str | None) -> str | None:
    """The running cluster to join: ``address`` (``--address``), else RAY_ADDRESS; None: none given."""
    return address or os.environ.get("RAY_ADDRESS")


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


def start_workers(spec: SweepSpec, n: int) -> tuple[Any, list[Any], str, dict[str, Any]]:
    """Pool plus ``n`` named workers, each registered once its model is loaded.

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
    created: list[Any] = []  # actors this call started: stopped again if the start fails (kept ones included)
    try:
        return _start_workers(spec, n, tag, pool, pool_name, created)
    except BaseException:
        ray.kill(pool)
        for w in created:
            ray.kill(w, no_restart=True)
        raise


def _start_workers(spec: SweepSpec, n: int, tag: str, pool: Any, pool_name: str,
                   created: list[Any]) -> tuple[Any, list[Any], str, dict[str, Any]]:
    from auto_quantize_model.actors.settings import WorkerSpec
    from auto_quantize_model.actors.worker import ModelWorker

    # Set before the worker process imports torch (Ray leaves an explicit OMP_NUM_THREADS alone).
    threads = str(spec.worker.num_threads or 1)
    threads_env = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}
    keep = spec.worker.keep
    signature = WorkerSpec.from_sweep_dict(spec.to_dict()).load_signature()
    if keep:
        names = [f"{KEEP_PREFIX}{signature}-{i}" for i in range(n)]
    else:
        names = [f"autoquant-worker-{tag}-{i}" for i in range(n)]
    attached = {name: _attach_kept(spec, name, pool_name, signature) for name in names} if keep else {}
    others = [k for k in _kept_worker_names() if k not in names]
    if others:
        log.warning("%d kept worker(s) of other settings or code are on this cluster (%s); free them with "
                    "`autoquant release-workers`", len(others), ", ".join(others))
    _check_room(spec, sum(attached.get(name) is None for name in names), n, others)
    workers, reused = [], []
    for name in names:
        worker = attached.get(name)
        reused.append(worker is not None)
        if worker is None:
            try:
                worker = cast(Any, ModelWorker).options(
                    name=name, namespace=NAMESPACE, num_gpus=spec.worker.num_gpus, num_cpus=spec.worker.num_cpus,
                    runtime_env=threads_env, lifetime="detached" if keep else None,
                ).remote(spec.to_dict(), name, pool_name, NAMESPACE)
            except ValueError as exc:  # the name is taken: another driver started this kept worker a moment ago
                raise UserError(f"another sweep is starting the kept worker {name} right now; run this sweep again "
                                "once it has started") from exc
            created.append(worker)
        workers.append(worker)
    try:
        infos = ray.get([w.info.remote() for w in workers])
    except ray.exceptions.RayActorError as exc:
        cause = getattr(exc, "cause", None) or exc
        last = str(cause).strip().splitlines()[-1].removeprefix("auto_quantize_model.errors.UserError: ")
        raise UserError(f"a model worker failed to start: {last}") from exc
    identities = ray.get([w.identity.remote() for w in workers])
    if any(i != identities[0] for i in identities[1:]):
        raise UserError("model workers loaded different weights or data (their identities differ); give every node "
                        "the same --model-dir and captions")
    ray.get([pool.register.remote(i["name"], i["warm_keys"]) for i in infos])
    for i, was_kept in zip(infos, reused, strict=True):
        how = f"kept from an earlier sweep (serving its sweep {i['sweeps_served']})" if was_kept else \
            f"load {i['load_seconds']:.1f}s"
        log.info("worker %s: %s (CUDA_VISIBLE_DEVICES=%s), %s, pristine on %s, %d host threads", i["name"],
                 i["device"], i["cuda_visible_devices"], how, i["pristine_on"], i["num_threads"])
    return pool, workers, pool_name, identities[0]


def release_kept_workers(address: str | None, force: bool = False) -> tuple[list[str], list[str]]:
    """Kill the kept model workers on the cluster at ``address`` (or RAY_ADDRESS) that no sweep is using (with
    ``force``, all of them). Returns the names released and the names left serving a running sweep."""
    address = cluster_address(address)
    if not (address or ray.is_initialized()):
        raise UserError("release-workers needs the running cluster: pass --address or set RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
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
