"""The one error type the CLI turns into a single clear line and exit status 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix, in one line."""

    exit_code = 2


def check_positive(flag: str, value: object) -> None:
    """``--flag`` must be a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"--{flag} must be a positive integer, got {value!r}")


def check_output_dir(path: str | Path) -> Path:
    """An output directory may exist, but must not be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {p} is a file; pass a directory path for --output-dir")
    return p
