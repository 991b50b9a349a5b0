"""What a sweep learns as its trials finish: one log line each, the rows an interrupted sweep still reports, and
when the first result came (a phase of the sweep's start)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class Progress:
    """Fed every reported result by either scheduler (Tune's callback in the driver's thread, or the direct
    scheduler's threads)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.results: dict[str, dict[str, Any]] = {}  # by our trial id: what an interrupted sweep still reports
        self.first_result_at: float | None = None  # time.time() of the first report
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config, callbacks included; a lock does not
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def record(self, result: dict[str, Any]) -> None:
        """One finished trial (ours: its id is ``result["trial"]``; Tune's own ``trial_id`` names the unit)."""
        with self._lock:
            self.done += 1
            if self.first_result_at is None:
                self.first_result_at = time.time()
            if result.get("trial"):
                self.results[result["trial"]] = dict(result)
            done = self.done
        if result.get("status") != "ok":
            log.info("[%d/%d] %s FAILED: %s", done, self.total, result.get("trial"), result.get("error"))
            return
        extra = f", ppl {result['perplexity']:.4g}, KL {result['kl_mean']:.3g}" if result.get("perplexity") else ""
        log.info("[%d/%d] %s on %s: %d/%d quantized, %.3f bits (met %s), scores %s%s, %.1fs (%.0fs elapsed)",
                 done, self.total, result["trial"], result["worker"], result["num_quantized_layers"],
                 result["num_layers"], result["effective_bits_achieved"], result["budget_met"],
                 "reused" if result.get("from_previous_run") else ("computed" if result["scored"] else "reused"),
                 extra, result["time_trial"], time.perf_counter() - self.start)
