"""What every subcommand shares: output-dir checks and logging setup."""

from __future__ import annotations

import logging

from auto_quantize_model.errors import check_output_dir

__all__ = ["check_output_dir", "setup_logging"]


def setup_logging(verbose: bool) -> None:
    """One format for every entry point; chatty third-party loggers kept at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "modelopt", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
