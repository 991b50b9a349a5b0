#!/usr/bin/env bash
# The main job on the embedded default: every catalog scheme on a tiny Qwen2.5-VL, demo captions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/autoquant demo --output-dir "${1:-runs/demo}"
