"""The lease pool: hands free model workers to trials and takes them back.

Rules it enforces (state lives only here, so every trial process sees the same picture):

- a worker serves one trial at a time;
- no two workers score the same scoring key at once: a trial whose key is being scored waits, then
  re-solves from the shared search checkpoint instead of scoring again;
- a trial goes preferably to a worker that already scored or reused its key (warm in page cache);
- a lease comes back when the worker finishes (the worker releases it itself, so a trial process
  that dies does not strand a worker), when the trial reports the worker dead, or when the same
  trial id asks again (a retry of a trial whose process died).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=0)
class WorkerPool:
    """Async actor: ``acquire`` waits on a condition without blocking other calls."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, Any]] = {}
        self.scoring: dict[str, str] = {}  # scoring key -> worker scoring it now
        self.scored: set[str] = set()  # keys with a finished scoring pass
        self.passes: dict[str, int] = {}  # scoring passes actually run, per key
        self.reuses = 0
        # Each unit's sweep trials with their scoring keys, published by the driver once the first worker has
        # loaded (the keys need its model and data identity), so the scheduler can start while the workers load.
        self.units: dict[str, list[dict[str, Any]]] | None = None
        self.start_error: str | None = None  # the workers failed to start: waiting units end quietly
        # Wall-clock times (time.time()) for the sweep's phases: when each worker joined, when the first unit asked
        # for its trials (before any worker is ready when Tune's start overlaps the load), when the first lease went.
        self.registered_at: dict[str, float] = {}
        self.first_unit_request_at: float | None = None
        self.first_lease_at: float | None = None
        self.cond = asyncio.Condition()

    async def publish(self, units: dict[str, list[dict[str, Any]]]) -> None:
        """The sweep's trials, keyed, by Tune trial (unit) id."""
        async with self.cond:
            self.units = units
            self.cond.notify_all()

    async def fail(self, error: str) -> None:
        """The workers did not start (the driver reports why): release every Tune trial waiting for its unit."""
        async with self.cond:
            self.start_error = error
            self.cond.notify_all()

    async def unit_trials(self, unit_id: str) -> list[dict[str, Any]] | None:
        """Block until the trials of ``unit_id`` are published; None once the start has failed."""
        if self.first_unit_request_at is None:
            self.first_unit_request_at = time.time()
        async with self.cond:
            while self.units is None and self.start_error is None:
                await self.cond.wait()
            return None if self.units is None else self.units[unit_id]

    async def register(self, name: str, warm_keys: list[str] | tuple[str, ...] = ()) -> None:
        """Add a worker (once it has loaded its model). ``warm_keys``: scoring keys whose searched model it still
        holds from an earlier sweep (a kept worker), so trials of those keys go to it first."""
        async with self.cond:
            self.workers[name] = {"busy": False, "trial": None, "keys": set(warm_keys), "lease": 0}
            self.registered_at[name] = time.time()
            self.cond.notify_all()

    def _pick(self, key: str | None) -> tuple[str | None, bool]:
        free = [n for n, w in self.workers.items() if not w["busy"]]
        if not free:
            return None, False
        if key is None or key in self.scored:
            warm = [n for n in free if key in self.workers[n]["keys"]]
            return (warm or free)[0], False
        if key in self.scoring:  # someone is scoring it: wait for the checkpoint
            return None, False
        warm = [n for n in free if key in self.workers[n]["keys"]]  # a kept worker may hold it from a past sweep
        return (warm or free)[0], True

    async def acquire(self, trial_id: str, key: str | None) -> dict[str, Any]:
        """Block until a worker may take this trial; returns the lease."""
        async with self.cond:
            for name, w in self.workers.items():  # a retried trial frees what its dead process held
                if w["trial"] == trial_id:
                    self._free(name, key_ok=False)
            while True:
                if self.start_error is not None:  # no worker will come: the waiting unit ends, the driver says why
                    raise RuntimeError(f"the sweep's workers did not start: {self.start_error}")
                name, will_score = self._pick(key)
                if name is not None:
                    break
                await self.cond.wait()
            if self.first_lease_at is None:
                self.first_lease_at = time.time()
            w = self.workers[name]
            w.update(busy=True, trial=trial_id, lease=w["lease"] + 1)
            if will_score:
                self.scoring[key] = name
            return {"worker": name, "trial_id": trial_id, "key": key, "will_score": will_score, "lease": w["lease"]}

    def _free(self, name: str, key_ok: bool) -> None:
        w = self.workers[name]
        for key, holder in list(self.scoring.items()):
            if holder == name:
                del self.scoring[key]
                if key_ok:
                    self.scored.add(key)
        w.update(busy=False, trial=None)

    async def release(self, lease: dict[str, Any], ok: bool, scored: bool | None = None, reused: int = 0) -> None:
        """Give a worker back. ``scored``: whether a trial under the lease computed scores; ``reused``: how many
        of its trials re-solved from scores computed before."""
        async with self.cond:
            w = self.workers.get(lease["worker"])
            if w is None or w["lease"] != lease["lease"] or not w["busy"]:
                return  # already freed (a retry or a dead-worker report came first)
            key = lease["key"]
            if ok and key is not None:
                w["keys"].add(key)
                self.scored.add(key)
                if scored:
                    self.passes[key] = self.passes.get(key, 0) + 1
                self.reuses += reused
            self._free(lease["worker"], key_ok=ok)
            self.cond.notify_all()

    async def worker_died(self, lease: dict[str, Any]) -> None:
        """A trial saw its worker die: free the lease; the restarted worker has reloaded (cold)."""
        async with self.cond:
            w = self.workers.get(lease["worker"])
            if w is not None and w["lease"] == lease["lease"] and w["busy"]:
                w["keys"] = set()
                self._free(lease["worker"], key_ok=False)
            self.cond.notify_all()

    async def stats(self) -> dict[str, Any]:
        """Scoring passes per key, reuses, and who is busy (for tests and the summary)."""
        return {"passes": dict(self.passes), "reuses": self.reuses, "scored_keys": sorted(self.scored),
                "busy": {n: w["trial"] for n, w in self.workers.items() if w["busy"]},
                "workers": sorted(self.workers), "registered_at": dict(self.registered_at),
                "first_unit_request_at": self.first_unit_request_at, "first_lease_at": self.first_lease_at}
