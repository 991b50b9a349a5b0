"""A `ray start --head` of one's own, for benchmarks and tests: free ports, its own temp dir, stopped through its
process group (never `ray stop`, which stops every Ray of every user on the machine).

    with RayHead(tmp_dir, num_cpus=2, num_gpus=1) as head:
        subprocess.run([..., "--address", head.address], env=head.env)

``head.env`` is the environment a client on this machine uses (RAY_TMPDIR = the head's temp dir, so a plain
``ray.init()`` finds it as `ray start` recorded it). ``kill()`` kills the head the way a crashed machine or an OOM
killer would: no `ray stop`, so the record of its address stays behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports that are free now (bound together, then released)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayHead:
    """A one-node Ray cluster started with `ray start --head --block` in its own session."""

    def __init__(self, temp_dir: str | Path, num_cpus: int = 2, num_gpus: int = 0, auth_mode: str = "disabled",
                 env: dict[str, str] | None = None, start_timeout: float = 120.0) -> None:
        self.temp_dir = Path(temp_dir)
        self.num_cpus, self.num_gpus, self.start_timeout = num_cpus, num_gpus, start_timeout
        base = dict(os.environ if env is None else env)
        base.pop("RAY_ADDRESS", None)
        # RAY_TMPDIR: sockets and session files under it; Unix socket paths must stay under 108 characters.
        self.env = {**base, "RAY_TMPDIR": str(self.temp_dir), "RAY_USAGE_STATS_ENABLED": "0"}
        if auth_mode:
            self.env["RAY_AUTH_MODE"] = auth_mode
        self.gcs_port, self.dashboard_port, client_port, agent_port = free_ports(4)
        self._ports = ["--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port),
                       "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port)]
        self.proc: subprocess.Popen | None = None

    @property
    def record(self) -> Path:
        """Where `ray start` records the head's address for a plain ``ray.init()`` on this machine."""
        return self.temp_dir / "ray" / "ray_current_cluster"

    @property
    def address(self) -> str:
        """The GCS address (``127.0.0.1:PORT``)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard and job API (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> RayHead:
        """Start the head and wait until it has recorded its address (``start_timeout`` seconds at most)."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.record.unlink(missing_ok=True)
        log = open(self.temp_dir / "ray_start.log", "w")  # noqa: SIM115 - the head's output, for a failed start
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", *self._ports,
             "--num-cpus", str(self.num_cpus), "--num-gpus", str(self.num_gpus), "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while not (self.record.exists() and self.record.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = (self.temp_dir / "ray_start.log").read_text()[-2000:]
                raise RuntimeError(f"ray start --head did not come up:\n{tail}")
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL the head's process group and anything else under its temp dir (workers it started)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None
        mark = str(self.temp_dir)
        out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if mark in args and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
