"""Every Ray connection has a deadline and fails in one line (issue 24, item 3: hangs).

Each case runs the CLI in a fresh process, as a user would, with a short deadline (``AUTOQUANT_RAY_CONNECT_TIMEOUT``)
and a hard timeout: on the old code `release-workers --address 127.0.0.1:1`, `sweep --keep-workers` with a dead
RAY_ADDRESS and a plain `sweep` after a `ray start` head died retried for minutes (killed at 240-600 s), an explicit
`--address` to a token-auth head gave a 40-line traceback after 20 s, and the README's `ray job submit` line was
refused by the job API. Heads are our own (`scripts/bench/ray_head.py`: free ports, own temp dir, never `ray stop`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "bench"))
from ray_head import RayHead, free_ports  # noqa: E402

DEADLINE_S = "3"
TOKEN = "0123456789abcdef" * 4


@pytest.fixture
def ray_tmp(tmp_path):
    """A short RAY_TMPDIR of the test's own (Ray's Unix socket paths under it must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="aqr-", dir="/tmp"))
    (tmp_path / "ray").symlink_to(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The client's environment: the test's own RAY_TMPDIR (``ray_tmp``), HOME (no token) and a short deadline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    ray_dir = (tmp_path / "ray").resolve() if (tmp_path / "ray").is_symlink() else tmp_path / "ray"
    env.update({"PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_dir), "RAY_USAGE_STATS_ENABLED": "0",
                "AUTOQUANT_RAY_CONNECT_TIMEOUT": DEADLINE_S, "HOME": str(tmp_path / "home"),  # no ~/.ray token
                # ... but the usual cache (format facts: no ModelOpt import in the driver)
                "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")})
    ray_dir.mkdir(exist_ok=True)
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str], timeout: float = 50) -> subprocess.CompletedProcess:
    """The CLI in a fresh process; a hang fails the test (TimeoutExpired) instead of blocking it."""
    return subprocess.run([sys.executable, "-m", "auto_quantize_model.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("autoquant: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _sweep_args(tiny_model_dir, tmp_path, *extra: str) -> list[str]:
    return ["sweep", "--name", "s", "--model-dir", str(tiny_model_dir), "--storage-path", str(tmp_path / "sweeps"),
            "--captions-path", "demo", "--schemes", "fp8_autoquant_top25", "--effective-bits", "12",
            "--max-calib-samples", "8", "--calib-seq-len", "32", *extra]


def test_release_workers_at_a_closed_port_is_one_line(tmp_path):
    (port,) = free_ports(1)
    t = time.monotonic()
    done = _cli(["release-workers", "--address", f"127.0.0.1:{port}"], _env(tmp_path))
    _one_line(done, f"127.0.0.1:{port}", "connection refused", "ray start --head")
    assert time.monotonic() - t < 30


def test_keep_workers_with_a_dead_ray_address_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    (port,) = free_ports(1)
    done = _cli(_sweep_args(tiny_model_dir, tmp_path, "--keep-workers"),
                _env(tmp_path, RAY_ADDRESS=f"127.0.0.1:{port}"))
    _one_line(done, f"127.0.0.1:{port}", "RAY_ADDRESS", "connection refused")
    assert not (tmp_path / "sweeps" / "s").exists()


def test_a_server_that_never_answers_meets_the_deadline(tmp_path):
    """A port that accepts connections but never speaks (a wedged head, a firewall that holds connections)."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))  # Ray connects to 127.0.0.1 by the node IP
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # accepted, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        t = time.monotonic()
        done = _cli(["release-workers", "--address", f"127.0.0.1:{port}"], _env(tmp_path))
        _one_line(done, f"127.0.0.1:{port}", f"no answer within {DEADLINE_S} s")
        assert time.monotonic() - t < 30
    finally:
        stop.set()
        thread.join(5)
        for c in held:
            c.close()
        server.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_sweep_after_the_recorded_head_died_runs_on_its_own_ray(tiny_model_dir, tmp_path, ray_tmp):
    """`ray start --head`, then the head dies without `ray stop` (SIGKILL of its processes): its address stays
    recorded in $RAY_TMPDIR/ray/ray_current_cluster, where a plain ray.init() looks. The sweep says so once and
    starts its own local Ray instead of retrying the dead one."""
    head = RayHead(ray_tmp, num_cpus=1).start()
    recorded = head.record.read_text().strip()
    head.kill()
    assert head.record.exists()  # the stale record a crashed head leaves behind
    t = time.monotonic()
    done = _cli(_sweep_args(tiny_model_dir, tmp_path), _env(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is gone" in done.stderr and recorded in done.stderr and "ray stop" in done.stderr
    assert "1 trials (1 ok)" in done.stdout
    # Everything after the check is the sweep itself (local Ray start, worker load, one trial): the check is quick.
    assert time.monotonic() - t < 200


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A live head with token auth on (its token in a file of its own, not ~/.ray/auth_token)."""
    root = tmp_path_factory.mktemp("tokenhead")
    token = root / "token"
    token.write_text(TOKEN)
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(token)}
    short = Path(tempfile.mkdtemp(prefix="aqr-", dir="/tmp"))
    try:
        with RayHead(short, num_cpus=1, auth_mode="token", env=env) as head:
            yield head, token
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_explicit_address_to_a_token_auth_head_uses_the_local_token(token_head, tmp_path):
    """No RAY_AUTH_MODE in the client: the token is found and used for an explicit HOST:PORT, as Ray does only for
    `auto`; a wrong or missing token is one line saying where the token must come from."""
    head, token = token_head
    done = _cli(["release-workers", "--address", head.address], _env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token)))
    assert done.returncode == 0 and "released 0 kept worker(s)" in done.stdout, done.stderr[-3000:]
    wrong = tmp_path / "wrong"
    wrong.write_text("f" * 64)
    done = _cli(["release-workers", "--address", head.address], _env(tmp_path, RAY_AUTH_TOKEN_PATH=str(wrong)))
    _one_line(done, head.address, "refused the auth token from", str(wrong))
    done = _cli(["release-workers", "--address", head.address], _env(tmp_path))  # no token anywhere
    _one_line(done, head.address, "requires token auth", "~/.ray/auth_token")
    done = _cli(["release-workers", "--address", head.address],
                _env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token), RAY_AUTH_MODE="disabled"))
    _one_line(done, head.address, "RAY_AUTH_MODE=disabled")


def _readme_cluster_lines() -> list[str]:
    """The README's commands for a running cluster, as written (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("**Against a running cluster**"):]
    begin = block.index("```bash") + len("```bash")
    return [ln.split(" #")[0].strip() for ln in block[begin: block.index("```", begin)].splitlines() if ln.strip()]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("token_before", [True, False], ids=["token-exists", "no-token-yet"])
def test_readme_job_submit_line_runs_as_written(tiny_model_dir, tmp_path, ray_tmp, token_before):
    """The README's cluster lines, run as written: its token step, `ray start --head` (which turns token auth on
    when a token exists) and the job line, whose client is Ray's own CLI. Only the head's ports (free ones: other
    clusters may run on this machine, so the job API's port is given as `ray start` prints it) and the sweep config
    (the tiny job example, with this test's paths) differ. HOME is the test's own (~/.ray/auth_token).

    ``token-exists``: a machine where any local ``ray.init()`` ran before (the demo, a plain sweep): Ray 2.60 wrote
    ~/.ray/auth_token then, so `ray start --head` turns token auth on, and the old README line was refused."""
    if token_before:
        (tmp_path / "home" / ".ray").mkdir(parents=True)
        (tmp_path / "home" / ".ray" / "auth_token").write_text(TOKEN)
    lines = _readme_cluster_lines()
    assert "ray start --head" in lines
    (submit,) = [ln for ln in lines if "ray job submit" in ln]
    assert "--working-dir . -- autoquant sweep --config" in submit
    env = _env(tmp_path)
    env.pop("AUTOQUANT_RAY_CONNECT_TIMEOUT")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # ray and autoquant of this environment
    for line in lines[: lines.index("ray start --head")]:  # what the README runs before the head starts
        subprocess.run(line, shell=True, cwd=REPO, env=env, check=True, capture_output=True, timeout=60)
    config = tmp_path / "job.toml"
    example = (REPO / "examples" / "sweep_tiny_job.toml").read_text()
    example = re.sub(r'model_dir = ".*"', f'model_dir = "{tiny_model_dir}"', example)
    example = re.sub(r'storage_path = ".*"', f'storage_path = "{tmp_path / "sweeps"}"', example)
    example = re.sub(r"effective_bits = \[.*\]", "effective_bits = [12.0]", example)
    example = re.sub(r"schemes = \[.*\]", 'schemes = ["fp8_autoquant_top25"]', example)
    config.write_text(example)
    with RayHead(ray_tmp, num_cpus=2, auth_mode="", env=env) as head:  # the auth mode `ray start` picks
        job = re.sub(r"--config \S+", f"--config {config}", submit)
        done = subprocess.run(job, shell=True, cwd=REPO, env={**env, "RAY_API_SERVER_ADDRESS": head.dashboard},
                              capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-4000:]
    assert (tmp_path / "sweeps" / "tiny-job" / "summary.md").is_file()
