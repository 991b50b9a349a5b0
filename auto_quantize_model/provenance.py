"""Versions and git revision recorded in every result file."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "nvidia-modelopt", "auto-quantize-model", "pulp")


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, None where it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shape a result, plus Python's (a new dict each call)."""
    return dict(_versions())


@functools.cache
def _versions() -> tuple[tuple[str, str | None], ...]:
    # Read once per process: parsing the installed packages' metadata took ~27 ms per manifest (every re-solve).
    return (*((name, package_version(name)) for name in PACKAGES), ("python", platform.python_version()))


@functools.cache
def git_revision() -> str | None:
    """The commit this package runs from (with ``-dirty`` if the tree has changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def code_fingerprint() -> str:
    """Hash of this package's Python sources as they are on disk: two processes with equal fingerprints run the same
    code (a kept model worker is reused only by a driver whose code matches its own)."""
    import hashlib

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
