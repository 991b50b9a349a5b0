"""SIGINT/SIGTERM during a sweep: stop Tune, let the driver write an honest summary and exit non-zero.

Tune's own SIGINT handler ends ``fit()`` quietly as if the grid had finished. Ours records which signal
came, so the driver can tell an interrupted sweep from a finished one. Inside ``fit()`` it asks Tune to stop
gracefully through Tune's SIGUSR1 handler (no exception thrown through Tune's internals); outside it raises
:class:`SweepInterrupted`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator


class SweepInterrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """Raised in the driver's main thread by SIGINT or SIGTERM."""


class _NoTuneResumeHint(logging.Filter):
    """Drop Tune's "Resume experiment with: Tuner.restore(...)": our hint is the ``--resume`` command line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage() and "Resume experiment with" not in record.getMessage()


class Stop:
    """What the handler saw: the signal's name once one came."""

    signal_name: str | None = None
    in_fit = False  # set by the driver around Tuner.fit(), where Tune's SIGUSR1 handler is installed


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """Within the block, SIGINT and SIGTERM raise SweepInterrupted once (a second signal does the default)."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")

    def handler(signum: int, frame) -> None:
        for s, h in previous.items():
            signal.signal(s, h)
        stop.signal_name = signal.Signals(signum).name
        if stop.in_fit and hasattr(signal, "SIGUSR1"):
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's graceful stop: fit() returns after this step
            return
        raise SweepInterrupted(stop.signal_name)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    for s in previous:
        signal.signal(s, handler)
    hint_filter = _NoTuneResumeHint()
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(hint_filter)
    try:
        yield stop
    finally:
        tune_log.removeFilter(hint_filter)
        for s, h in previous.items():
            signal.signal(s, h)
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env
