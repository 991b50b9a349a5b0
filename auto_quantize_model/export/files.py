"""Files of an export: the output directory's checks, the atomic write, copied processor files, permissions."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_directory, current_umask

# Tokenizer, processor and chat template files copied from the source checkpoint when present.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json",
)


def check_output_dir(out: Path) -> None:
    """Refuse, before loading anything, an output dir that exists, is a link, or cannot be written to."""
    if out.is_symlink():
        raise UserError(f"export dir {out} is a symbolic link; pass a new directory path (not a link) as --output-dir")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export dir {out} exists and is not empty; pass a new --output-dir")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write the export next to {out} ({exc.strerror or exc}); pass a writable "
                        "--output-dir") from exc


@contextlib.contextmanager
def writing(out: Path) -> Iterator[Path]:
    """``atomic_directory``, with every write failure (disk full, permissions, I/O) turned into one line; the
    temporary directory is removed, so nothing complete-looking stays behind."""
    from safetensors import SafetensorError

    try:
        with atomic_directory(out) as tmp:
            yield tmp
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160]
        raise UserError(f"could not write the export to {out} ({reason}); nothing was kept: free space or pass a "
                        "writable --output-dir") from exc


def copy_processor_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def umask_permissions(root: Path) -> None:
    """Every result follows the umask (0777/0666 minus it): safetensors writes 0600, mkdtemp 0700."""
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
