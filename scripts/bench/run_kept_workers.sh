#!/usr/bin/env bash
# On one GPU of a GPU machine, the 20-trial grid (bench_sweep.py defaults), each way a user could run it, one after
# another as fresh processes in one call; each step writes its JSON to $OUT (default /tmp/kept), and `report` prints
# the table (walls, ratios, peak GPU memory per worker, the repeat sweep's start phase by phase). Expects the
# random-weight 3B at $MODEL (scripts/bench/gpu_setup.py writes it, builds ModelOpt's extensions and warms the format
# facts: run it first, in the same call or an earlier one on the same machine).
#   session  one Python process over SearchSession (shared scoring passes): the strongest single-process baseline
#   sweep    `autoquant sweep` on a local Ray it starts itself, 1 worker (the first sweep)
#   sweep2   the same with 2 workers sharing the one GPU (--worker-gpus 0.5; not in the default STEPS)
#   sweep-direct  the same with --scheduler direct (the driver's threads instead of Tune; not in the default STEPS)
#   api      one Python process over the project's API (run_scheme per trial, one cache_dir)
#   kept     a `ray start --head` of its own (free ports; stopped through its process group, never `ray stop`), the
#            sweep on it twice with --keep-workers and one --cache-dir (first, repeat), then release-workers
#   loop     `autoquant run` per trial with one shared --cache-dir: the first trial of each scoring key and
#            $LOOP_RESOLVES re-solves are timed, the rest projected from the re-solves' mean
#   report   the table from the JSON files above
#
#   MODEL=/tmp/qwen3b OUT=/tmp/kept bash scripts/bench/run_kept_workers.sh
#   STEPS="kept report" ... runs a subset (report reads whatever $OUT holds).
set -euo pipefail
MODEL=${MODEL:-/tmp/qwen3b}
OUT=${OUT:-/tmp/kept}
CAPTIONS=${CAPTIONS:-$MODEL/bench_captions.txt}
WORK=${WORK:-/tmp/kept-work}
STEPS=${STEPS:-session sweep api kept loop report}
LOOP_RESOLVES=${LOOP_RESOLVES:-2}
mkdir -p "$OUT" "$WORK"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
bench() { $PY scripts/bench/bench_sweep.py "$@" --model-dir "$MODEL" --captions-path "$CAPTIONS"; }
start=$(date +%s)
step_done() { echo "$1: done at $(( $(date +%s) - start )) s"; }
for step in $STEPS; do
  case $step in
    session)
      bench session --name session --work "$WORK/session" --json-out "$OUT/session.json" > "$WORK/session.log" 2>&1 \
        || { tail -20 "$WORK/session.log"; exit 1; } ;;
    sweep)
      bench sweep --name local --work "$WORK/local" --json-out "$OUT/sweep-local.json" > "$WORK/local.log" 2>&1 \
        || { tail -20 "$WORK/local.log"; exit 1; } ;;
    sweep2)  # two workers sharing the one GPU (half a GPU each): the two scoring keys' units run side by side
      bench sweep --num-workers 2 --worker-gpus 0.5 --name local-2 --work "$WORK/local-2" \
        --json-out "$OUT/sweep-local-2.json" > "$WORK/local-2.log" 2>&1 || { tail -20 "$WORK/local-2.log"; exit 1; } ;;
    sweep-direct)
      bench sweep --scheduler direct --name local-direct --work "$WORK/local-direct" \
        --json-out "$OUT/sweep-direct.json" > "$WORK/local-direct.log" 2>&1 || { tail -20 "$WORK/local-direct.log"; exit 1; } ;;
    api)
      bench api-loop --name api-loop --work "$WORK/api-loop" --json-out "$OUT/api-loop.json" > "$WORK/api-loop.log" 2>&1 \
        || { tail -20 "$WORK/api-loop.log"; exit 1; } ;;
    kept)
      bench kept --head-gpus 1 --work "$WORK/kept" --json-out "$OUT/kept.json" > "$WORK/kept.log" 2>&1 \
        || { tail -30 "$WORK/kept.log"; exit 1; }
      grep -E "^kept-(first|second):" "$WORK/kept.log" || true ;;
    loop)
      bench loop --shared-cache --resolves "$LOOP_RESOLVES" --name loop --work "$WORK/loop" \
        --json-out "$OUT/loop-shared.json" 2>&1 | tee "$WORK/loop.log" | grep '^loop ' || true ;;
    report)
      $PY scripts/bench/bench_sweep.py report --work "$OUT" --json-out "$OUT/report.json" | grep -v '^RESULT' ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  step_done "$step"
done
