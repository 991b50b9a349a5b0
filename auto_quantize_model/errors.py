"""The one error type the CLI turns into a single clear line and exit status 2, and the line an expected I/O failure
(a full disk, a read-only or missing directory) becomes, for the CLI and the sweep's trial records alike."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix, in one line."""

    exit_code = 2


def check_positive(flag: str, value: object) -> None:
    """``--flag`` must be a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"--{flag} must be a positive integer, got {value!r}")


def check_output_dir(path: str | Path) -> Path:
    """An output directory may exist (or be a symlink to one), but must not be a file or a broken symlink."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise UserError(f"output dir {p} is a symlink to a missing path (or a symlink loop); point it at a directory "
                        "or remove it")
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {p} is a file; pass a directory path for --output-dir")
    return p


# Failures of the machine or the paths the user chose, not of this program: each becomes one line naming the path
# and what to do. Any other errno (EBADF, EINVAL...) points at a bug and keeps its traceback.
_FIXES = {
    errno.ENOSPC: "the file system is full; free space or choose a directory on another file system",
    errno.EDQUOT: "the disk quota is used up; free space or choose a directory on another file system",
    errno.EFBIG: "the file outgrew what the file system or the process's file-size limit allows; choose another "
                 "directory or raise the limit (ulimit -f)",
    errno.EROFS: "the file system is read-only; choose a writable directory",
    errno.EACCES: "permission denied; fix the permissions or choose a path you may write",
    errno.EPERM: "operation not permitted; fix the permissions or choose a path you may write",
    errno.ENOENT: "a file or directory on that path does not exist (or vanished meanwhile); check the path",
    errno.ENOTDIR: "a file stands where the path needs a directory; check the path",
    errno.EISDIR: "a directory stands where the path needs a file; check the path",
    errno.EEXIST: "something is in the way (a file, or a symlink to nowhere); remove it or choose another path",
    errno.ENOTEMPTY: "a directory in the way is not empty; remove it or choose another path",
    errno.ELOOP: "the path runs through a symlink loop; fix the symlink or choose another path",
    errno.ENAMETOOLONG: "the path or a name in it is too long; choose a shorter one",
    errno.EIO: "the device reported an I/O error; check the disk or choose another directory",
    errno.ESTALE: "a network file system handle went stale; remount it or run again",
    errno.EBUSY: "the path is busy (a mount point, or in use); choose another path",
    errno.ETXTBSY: "the file is in use; choose another path",
    errno.EXDEV: "the path crosses file systems where a rename must stay on one; keep the output on one file system",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run again",
    errno.ENFILE: "the system ran out of file handles; close other programs and run again",
}
# How I/O libraries written in Rust (safetensors, tokenizers: "(os error 28)") and C++ (Arrow: "[errno 28]") carry
# the OS error number inside exceptions that are no OSError.
_ERRNO_IN_MESSAGE = re.compile(r"\(os error (\d+)\)|\[errno (\d+)\]", re.IGNORECASE)


def io_errno(exc: BaseException) -> int | None:
    """The OS error number an exception reports, if it is an I/O failure with one."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if exc.__class__.__name__ == "SafetensorError" or isinstance(exc, OSError):
        m = _ERRNO_IN_MESSAGE.search(str(exc))
        if m:
            return int(m.group(1) or m.group(2))
    return None


def describe_io_failure(exc: BaseException) -> str | None:
    """One line for an expected I/O failure (the error, the path, the fix), or None for anything else."""
    code = io_errno(exc)
    if code not in _FIXES:
        return None
    what = getattr(exc, "strerror", None) or os.strerror(code)
    paths = [str(p) for p in (getattr(exc, "filename", None), getattr(exc, "filename2", None)) if p is not None]
    where = f" ({' -> '.join(paths)})" if paths else ""
    return f"{what}{where}: {_FIXES[code]}"
