"""Checks that run before the expensive part (model load, Ray start): cheap, one clear line each.

Every check raises :class:`UserError` naming the problem and the fix, so bad input costs seconds and leaves
nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from auto_quantize_model.errors import UserError
from auto_quantize_model.safetensors_header import check_header, checkpoint_files

# Set by Ray's job supervisor in the driver of a `ray job submit` job (ray/_private/runtime_env/constants.py).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def probe_writable(path: str | Path, what: str, flag: str) -> Path:
    """Create ``path`` (a directory) if needed and write then delete a probe file in it."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise UserError(f"{what} {p} is a symlink to a missing path (or a symlink loop); point it at a directory or "
                        f"pass another {flag}")
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file; pass a directory path for {flag}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autoquant-probe.", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"{what} {p} is not writable ({exc.strerror or exc.__class__.__name__}); "
                        f"pass a writable directory for {flag}") from exc
    return p


def check_checkpoint_files(model_dir: str | Path) -> None:
    """Tokenizer files present and every ``*.safetensors`` header intact (the weights are not read)."""
    p = Path(model_dir)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{p} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the tokenizer from the "
                        "original checkpoint into it")
    # The files the loader reads (a stray *.safetensors beside them is not its business), else every one there.
    for f in checkpoint_files(p) or sorted(p.glob("*.safetensors")):
        check_header(f)  # the loader's own checks, without torch: a corrupt file is refused before Ray or the load


def read_checkpoint_config(model_dir: str | Path) -> dict[str, Any]:
    """Validate ``model_dir`` and return its parsed config.json."""
    path = Path(model_dir)
    if not path.exists():
        raise UserError(f"model dir {path} does not exist; pass --model-dir with a local Hugging Face checkpoint")
    if not path.is_dir():
        raise UserError(f"model dir {path} is not a directory; pass the checkpoint folder, not a file")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint; point --model-dir at one")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{cfg_path} is unreadable ({exc.__class__.__name__}); re-download the checkpoint") from exc


def in_submitted_job() -> bool:
    """True in the driver of a ``ray job submit`` job (its working directory is a temporary copy)."""
    return bool(os.environ.get(RAY_JOB_ENV))


def check_job_paths(**paths: str | None) -> None:
    """Under ``ray job submit``, refuse relative output and model paths: they would resolve inside the
    job's temporary copy of the working directory and vanish with it."""
    if not in_submitted_job():
        return
    for key, value in paths.items():
        if value and not Path(value).is_absolute():
            raise UserError(f"{key} {value!r} is relative, but this sweep runs under `ray job submit`, whose working "
                            f"directory is a temporary copy; give an absolute {key} (shared by every node)")
