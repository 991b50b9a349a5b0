"""scripts/bootstrap.sh run twice at once (the demo and the tests started together): the second waits for the first.
On the old code the second deleted .venv/consumer while the first was installing into it, and the first's install
failed (here: a stand-in pip that checks its own half-written files are still there)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Stands in for .venv/bin/python: every call succeeds, except that `pip install --target DIR` writes a file of its own,
# waits, and fails if that file was deleted meanwhile (as a real pip does when its target vanishes under it).
FAKE_PYTHON = """#!/usr/bin/env bash
args="$*"
case "$args" in
  *--target*)
    target=$(echo "$args" | sed -e 's/.*--target \\([^ ]*\\).*/\\1/')
    mkdir -p "$target" && touch "$target/part-$$"
    sleep 1.5
    [ -f "$target/part-$$" ] || exit 1
    mv "$target/part-$$" "$target/done" ;;
esac
exit 0
"""


def _sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.mark.skipif(shutil.which("flock") is None, reason="bootstrap.sh serializes with flock (util-linux)")
def test_two_bootstraps_at_once_both_succeed_and_leave_the_consumer_installed(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "bootstrap.sh", root / "scripts" / "bootstrap.sh")
    shutil.copy(REPO / "scripts" / "consumer-requirements.txt", root / "scripts" / "consumer-requirements.txt")
    pyproject = b"[project]\nname = 'x'\n"
    (root / "pyproject.toml").write_bytes(pyproject)
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    (root / ".venv" / f".installed-{_sha16(pyproject)}").touch()  # the project itself counts as installed
    script = str(root / "scripts" / "bootstrap.sh")
    env = {**os.environ, "PYTHON": "python3"}
    first = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the first is inside its consumer install
    second = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    out, err = first.communicate(timeout=60)
    assert (first.returncode, second.returncode) == (0, 0), (err, second.stderr)
    assert "could not install" not in err + second.stderr
    consumer = root / ".venv" / "consumer"
    cstamp = _sha16((root / "scripts" / "consumer-requirements.txt").read_bytes() + pyproject)
    assert (consumer / f".installed-{cstamp}").is_file()
    assert (consumer / "done").is_file() and not list(consumer.glob("part-*"))
