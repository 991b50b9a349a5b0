"""What every subcommand shares: output-dir checks, logging setup, and the one line an expected I/O failure becomes."""

from __future__ import annotations

from auto_quantize_model.errors import check_output_dir, describe_io_failure
from auto_quantize_model.logs import setup_logging

__all__ = ["check_output_dir", "describe_io_failure", "setup_logging"]
