"""``autoquant``: argparse subcommands over the same API that Python callers use.

Each subcommand parses, validates, calls the API, and maps :class:`UserError`, and the I/O failures the machine
or the chosen paths cause (a full disk, a read-only or missing directory: ``common.describe_io_failure``), to one
line on stderr and exit status 2. Nothing here computes anything the API does not.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from auto_quantize_model.cli import eval_commands, export_commands, run_commands, sweep_commands
from auto_quantize_model.cli.common import check_output_dir, describe_io_failure, setup_logging
from auto_quantize_model.cli.run_commands import add_run_arguments, cmd_run
from auto_quantize_model.errors import UserError

__all__ = ["add_run_arguments", "build_parser", "check_output_dir", "cmd_run", "main", "setup_logging"]
log = logging.getLogger("autoquant")


def build_parser() -> argparse.ArgumentParser:
    """The ``autoquant`` parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="autoquant", description="Per-layer FP8/BF16 AutoQuant for VLM language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (run_commands, eval_commands, sweep_commands, export_commands):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - only expected I/O failures are turned into a line; the rest re-raise
        line = describe_io_failure(exc)
        if line is None:
            raise
        log.debug("the failure's traceback:", exc_info=True)  # -v shows where it happened
        print(f"{parser.prog}: error: {line}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        # Nothing half-written stays behind (atomic outputs, the search cache commits only finished searches).
        print(f"{parser.prog}: interrupted; nothing partial was kept, run the same command again", file=sys.stderr)
        return 130
