"""Logging setup shared by every entry point: the CLI and each Ray worker process (which starts without the
CLI's configuration). Low in the package so that actors need not import the CLI."""

from __future__ import annotations

import logging

# Chatty third-party loggers kept at WARNING.
QUIET_LOGGERS = ("transformers", "modelopt", "urllib3", "filelock")


def setup_logging(verbose: bool) -> None:
    """One format for every entry point; chatty third-party loggers kept at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
