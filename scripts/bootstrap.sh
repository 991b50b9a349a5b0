#!/usr/bin/env bash
# Create .venv and install the project with pinned dependencies. Idempotent: a second run that finds
# the same pyproject.toml installed does nothing. torch is installed first as the CPU build 2.13.0
# when no torch is present (a plain `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Two bootstraps at once (the demo and the tests started together) would both install into .venv and .venv/consumer,
# the second deleting what the first is writing: the second waits here for the first (flock, where it exists).
# A checkout that cannot be written to (a read-only mount with .venv already complete) skips the lock.
if command -v flock > /dev/null && touch .bootstrap.lock 2> /dev/null; then
  exec 9> .bootstrap.lock
  flock 9
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# The deployment side's transformers, apart from the project's (scripts/consumer-requirements.txt says why).
# It installs on top of the project's packages (--no-deps), so its stamp covers both files. Without a package index
# it is skipped with a warning: only its one test needs it (and says how to get it).
consumer=.venv/consumer
cstamp=$consumer/.installed-$(cat scripts/consumer-requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$cstamp" ]; then
  rm -rf "$consumer"
  if .venv/bin/python -m pip install -q --no-deps --target "$consumer" -r scripts/consumer-requirements.txt; then
    touch "$cstamp"
  else
    rm -rf "$consumer"
    echo "bootstrap: could not install scripts/consumer-requirements.txt into $consumer (no package index?);" \
      "tests/test_export_formats.py's newer-transformers test will fail until it is installed" >&2
  fi
fi
