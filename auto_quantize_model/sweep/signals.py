"""SIGINT/SIGTERM during a sweep: stop Tune, let the driver write an honest summary and exit non-zero.

Tune's own SIGINT handler ends ``fit()`` quietly as if the grid had finished; ours raises
:class:`SweepInterrupted` out of ``fit()`` instead (Tune cleans its trials up on the way out), so the
driver can tell an interrupted sweep from a finished one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class SweepInterrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """Raised in the driver's main thread by SIGINT or SIGTERM."""


class _Stop:
    signal_name: str | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[_Stop]:
    """Within the block, SIGINT and SIGTERM raise SweepInterrupted once (a second signal does the default)."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")

    def handler(signum: int, frame) -> None:
        for s, h in previous.items():
            signal.signal(s, h)
        stop.signal_name = signal.Signals(signum).name
        raise SweepInterrupted(stop.signal_name)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env
