"""Names that become paths: checked once, here, before anything is written.

A scheme name (from a schemes file, a recipe's file name or the catalog), a sweep name, a trial or run id:
each becomes a file or directory name under a run's own directory. :func:`check_path_name` accepts only one
plain path component (letters, digits, ``.``, ``_``, ``-``; no leading ``.`` or ``-``, at most
:data:`MAX_NAME_LENGTH` characters), so no name can climb out (``..``), start elsewhere (``/abs``), hide
(``.x``), read as a flag (``-x``) or carry NUL, control or separator characters. :func:`path_inside` checks
a path built from such a name still lies in the directory it was built under, the last line of defence
for paths derived from names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from auto_quantize_model.errors import UserError

# Leaves room for the suffixes and temporary-name decorations added to a name (a manifest's
# ``_quant_manifest.json``, a trial id's ``-b14-gradient-s16-<hash>``, ``.<name>.<random>.tmp``) under the
# 255-byte file-name limit of common file systems.
MAX_NAME_LENGTH = 128
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")


def is_path_name(name: object) -> bool:
    """Whether ``name`` is one safe path component (the rule :func:`check_path_name` enforces)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and name not in (".", "..")


def check_path_name(name: object, what: str, fix: str) -> str:
    """``name`` if it is one safe path component, else a one-line ``UserError`` naming ``what`` and ``fix``."""
    if not isinstance(name, str) or not is_path_name(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "..."
        raise UserError(f"{what} {shown} must be a single path component (one directory name or file name): "
                        f"letters, digits, '.', '_' or '-', not starting with '.' or '-', at most {MAX_NAME_LENGTH} "
                        f"characters; {fix}")
    return name


def path_inside(root: str | Path, path: str | Path, what: str) -> Path:
    """``path`` if it lies under ``root`` (both made absolute, ``..`` folded, ``root``'s symlinks followed);
    else a one-line ``UserError``. The last component is not followed: writes replace it, not its target."""
    base = Path(os.path.realpath(root))
    p = Path(os.path.abspath(path))
    target = Path(os.path.realpath(p.parent)) / p.name
    if p.name in ("", ".", "..") or not target.is_relative_to(base):
        raise UserError(f"{what} {path} would lie outside {root}; names that become paths must be single file names")
    return Path(path)
