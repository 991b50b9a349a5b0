"""Seconds per step of a multi-step job (a model load, a worker's start), in order: for log lines and benchmarks."""

from __future__ import annotations

import time


class StepTimes:
    """Seconds per named step, each measured from the end of the one before (or from creation or :meth:`mark`)."""

    def __init__(self, digits: int = 1) -> None:
        self.seconds: dict[str, float] = {}
        self.digits = digits  # decimals in ``str()``
        self._last = time.perf_counter()

    def mark(self) -> None:
        """Start the next step's clock now (time since the last step belongs to no step)."""
        self._last = time.perf_counter()

    def done(self, step: str) -> None:
        """Record ``step`` as ending now."""
        now = time.perf_counter()
        self.seconds[step] = round(now - self._last, 3)
        self._last = now

    def __str__(self) -> str:
        return format_steps(self.seconds, self.digits)


def format_steps(seconds: dict[str, float], digits: int = 1) -> str:
    """``imports 3.6s, load 17.4s, ...``"""
    return ", ".join(f"{k} {v:.{digits}f}s" for k, v in seconds.items())
