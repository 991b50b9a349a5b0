#!/usr/bin/env bash
# Lint (ruff) and type check (mypy) as configured in pyproject.toml (installs first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
