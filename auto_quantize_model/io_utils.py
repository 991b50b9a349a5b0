"""Atomic file writes and content hashes.

Every artifact a user might read (manifest, report, tables, checkpoints) is written to a temporary
name in the same directory and renamed into place, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is a set-and-get)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def set_default_mode(fd: int) -> None:
    """Give a ``mkstemp`` file (mode 0600) the mode any new file of this process gets (0666 & ~umask)."""
    os.fchmod(fd, 0o666 & ~current_umask())


# A full file system (or quota, or file-size limit) reports no file name; the writers below name their target.
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def naming_target(path: str | Path) -> Iterator[None]:
    """Re-raise a full-disk failure raised inside the block (an ``OSError`` without a file name, or a writer
    library's error carrying the OS error number) as an ``OSError`` naming ``path``: the CLI's one line then says
    where the space ran out."""
    from auto_quantize_model.errors import io_errno

    try:
        yield
    except Exception as exc:
        code = io_errno(exc)
        if code in FULL_DISK_ERRNOS and getattr(exc, "filename", None) is None:
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with naming_target(path), os.fdopen(fd, "wb") as fh:
            set_default_mode(fh.fileno())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN is refused: JSON has no NaN)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds.

    A ``path`` that is a symlink to a directory is replaced at its target (the link stays, as the user set it up).
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide results from other users and nodes
    try:
        with naming_target(path):
            yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


MAX_TOML_BYTES = 1 << 20  # settings and scheme files are a few KB; a cap keeps a hostile file from costing memory


def read_bytes_capped(path: Any, limit: int, what: str, hint: str) -> bytes:
    """The bytes of ``path`` (a ``Path`` or an importlib resource), refused in one line past ``limit`` bytes
    (read no further than that, so a huge or endless file costs nothing) or when it cannot be read."""
    from auto_quantize_model.errors import UserError

    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc}); check the path and its "
                        "permissions") from exc
    if len(data) > limit:
        raise UserError(f"{what} {path} is larger than {limit >> 10} KiB; {hint}")
    return data


def read_toml(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """Parse a TOML file; a missing, oversized or invalid file is a UserError naming ``what`` and the fix."""
    import tomllib

    from auto_quantize_model.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} {'is not a regular file' if p.exists() else 'does not exist'}; {hint}")
    data = read_bytes_capped(p, MAX_TOML_BYTES, what, hint)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{what} {p} is not valid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise UserError(f"{what} {p} nests arrays or tables too deeply; {hint}") from exc


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object in canonical form (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))


def user_cache_file(env_var: str, name: str) -> Path:
    """A small cache file of this project: ``$env_var`` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/auto_quantize_model/<name>``."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "auto_quantize_model" / name
