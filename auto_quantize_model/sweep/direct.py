"""The direct scheduler: the driver's own threads lease workers from the pool and run the units, without Tune.

What Tune adds (its start, a process per trial, its per-report bookkeeping) buys nothing once every worker is
loaded and attached, as in a repeat sweep on kept workers: the pool already hands out workers and takes them back,
resume already trusts only ``result.json``. Same outputs as the Tune scheduler: each trial reported once, a unit
whose worker died retried (``max_failures``; its finished trials report their ``result.json``), a unit that fails
past that recorded as its trials' error, SIGINT/SIGTERM stopping it (no trial starts after the signal).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from auto_quantize_model.sweep.progress import Progress
from auto_quantize_model.sweep.trial import run_unit

log = logging.getLogger(__name__)


def run_direct(units: list[dict[str, Any]], context: dict[str, str], *, n: int, max_failures: int,
               progress: Progress, start_failed: threading.Event) -> dict[str, str]:
    """Run every unit on at most ``n`` threads (one per worker); returns the error of each trial whose unit failed
    past ``max_failures``. A signal raised in the calling (main) thread stops every thread before its next trial;
    ``start_failed`` (a worker did not start: the driver raises why) returns at once, as Tune's stopper does."""
    queue = deque(units)
    lock = threading.Lock()
    stop = threading.Event()
    errors: dict[str, str] = {}

    def runner() -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                unit = queue.popleft()
            config = {"unit": {"unit_id": unit["unit_id"], "trial_ids": [t["trial_id"] for t in unit["trials"]]}}
            for attempt in range(max_failures + 1):
                try:
                    run_unit(config, context, progress.record, stop)
                    break
                except Exception as exc:  # noqa: BLE001 - as Tune does with a failed trial: retry, then record
                    msg = (str(exc).strip().splitlines() or [exc.__class__.__name__])[-1][:300]
                    if stop.is_set():
                        return
                    if attempt < max_failures:
                        log.warning("unit %s failed (%s); retry %d of %d", unit["unit_id"], msg, attempt + 1,
                                    max_failures)
                        continue
                    with lock:
                        errors.update({t: msg for t in config["unit"]["trial_ids"]})

    threads = [threading.Thread(target=runner, name=f"autoquant-unit-{i}", daemon=True)
               for i in range(max(1, min(n, len(units))))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive() and not start_failed.is_set():
                t.join(0.2)  # short waits: SIGINT/SIGTERM reach this (main) thread between them
    finally:
        stop.set()
    return errors
