"""What every subcommand shares: output-dir checks and logging setup."""

from __future__ import annotations

import logging
from pathlib import Path

from auto_quantize_model.errors import UserError


def check_output_dir(path: str | Path) -> Path:
    """An output directory may exist, but must not be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {p} is a file; pass a directory path for --output-dir")
    return p


def setup_logging(verbose: bool) -> None:
    """One format for every entry point; chatty third-party loggers kept at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "modelopt", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
