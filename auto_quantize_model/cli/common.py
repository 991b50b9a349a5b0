"""What every subcommand shares: output-dir checks and logging setup."""

from __future__ import annotations

from auto_quantize_model.errors import check_output_dir
from auto_quantize_model.logs import setup_logging

__all__ = ["check_output_dir", "setup_logging"]
