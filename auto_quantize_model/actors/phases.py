"""A model worker's load, timed per step (imports, load, data, probe, pristine copy, input stamp): for its log line,
``info()``, each trial's row and the driver's log line."""

from __future__ import annotations

import time


class LoadPhases:
    """Seconds per step of a worker's load, for its log line and the benchmarks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._last, 3)
        self._last = now

    def __str__(self) -> str:
        return format_phases(self.seconds)


def format_phases(seconds: dict[str, float]) -> str:
    """``imports 3.6s, load 17.4s, ...``: a worker's load phases, for log lines (the worker's and the driver's)."""
    return ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
