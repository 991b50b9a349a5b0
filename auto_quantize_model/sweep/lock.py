"""One live sweep per name and storage path: an advisory ``flock`` on ``<sweep_dir>/.sweep.lock``.

The kernel drops a ``flock`` when its holder exits, however it exits (SIGKILL included), so a dead
driver never leaves a stale lock behind; the pid and host written into the file are only for the message.
Linux NFS clients map ``flock`` onto NFS byte-range locks, so it also holds across nodes on shared storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from auto_quantize_model.errors import UserError

LOCK_FILE = ".sweep.lock"


@contextlib.contextmanager
def sweep_lock(sweep_dir: str | Path) -> Iterator[Path]:
    """Hold the sweep's lock for the block; a second live holder gets a one-line UserError."""
    d = Path(sweep_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"sweep {d} is already running ({holder}); wait for it to finish, or choose another "
                            "--name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
