#!/usr/bin/env bash
# On one GPU of a GPU machine, the 20-trial grid (bench_sweep.py defaults), each way a user could run it, one after
# another as fresh processes; each step writes its JSON to $OUT (default /tmp/kept). Expects the random-weight 3B
# at $MODEL (scripts/bench/gpu_setup.py writes it, builds ModelOpt's extensions and warms the format facts).
#   kept    `ray start --head`, then the sweep submitted to it with --keep-workers and a shared --cache-dir, twice
#   api     one Python process over the project's API (run_scheme per trial, one cache_dir)
#   sweep   `autoquant sweep` on a local Ray it starts itself, 1 worker
#   loop    `autoquant run` per trial with one shared --cache-dir (the first $LOOP_LIMIT trials of each scoring key
#           are timed; the rest are projected from the measured re-solves)
#
#   MODEL=/tmp/qwen3b OUT=/tmp/kept STEPS="kept api sweep" bash scripts/bench/run_kept_workers.sh
set -euo pipefail
MODEL=${MODEL:-/tmp/qwen3b}
OUT=${OUT:-/tmp/kept}
CAPTIONS=${CAPTIONS:-$MODEL/bench_captions.txt}
WORK=${WORK:-/tmp/kept-work}
STEPS=${STEPS:-kept api sweep}
LOOP_LIMIT=${LOOP_LIMIT:-2}
mkdir -p "$OUT" "$WORK"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
bench() { python3 scripts/bench/bench_sweep.py "$@" --model-dir "$MODEL" --captions-path "$CAPTIONS"; }
show() {  # one line per result file
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); keys=('wall_s','after_ray_start_s','scoring_passes','gpu_peak_gib','worker_load_phases','first_tune_request_s','workers_ready_s','projected_wall_s','timed_wall_s'); print(sys.argv[2], {k: d[k] for k in keys if k in d})" "$1" "$2"
}
for step in $STEPS; do
  case $step in
    kept)
      t=$(date +%s)
      python3 -m ray.scripts.scripts start --head --num-gpus=1 --num-cpus=16 --disable-usage-stats > "$WORK/ray_start.log" 2>&1
      echo "ray start: $(( $(date +%s) - t )) s" | tee "$OUT/ray_start.txt"
      trap 'python3 -m ray.scripts.scripts stop > /dev/null 2>&1 || true' EXIT
      for name in kept-first kept-second; do
        bench sweep --address auto --keep-workers --cache-dir "$WORK/cache" --name "$name" --work "$WORK/$name" \
          --json-out "$OUT/$name.json" > "$WORK/$name.log" 2>&1 || { tail -20 "$WORK/$name.log"; exit 1; }
        show "$OUT/$name.json" "$name"
      done
      python3 -m auto_quantize_model.cli release-workers --address auto | tee "$OUT/release.txt"
      python3 -m ray.scripts.scripts stop > /dev/null 2>&1 || true ;;
    api)
      bench api-loop --name api-loop --work "$WORK/api-loop" --json-out "$OUT/api-loop.json" > "$WORK/api-loop.log" 2>&1 \
        || { tail -20 "$WORK/api-loop.log"; exit 1; }
      show "$OUT/api-loop.json" api-loop ;;
    sweep)
      bench sweep --name local --work "$WORK/local" --json-out "$OUT/sweep-local.json" > "$WORK/local.log" 2>&1 \
        || { tail -20 "$WORK/local.log"; exit 1; }
      show "$OUT/sweep-local.json" sweep-local ;;
    loop)
      bench loop --shared-cache --limit-per-key "$LOOP_LIMIT" --name loop --work "$WORK/loop" \
        --json-out "$OUT/loop-shared.json" 2>&1 | tee "$WORK/loop.log" | grep '^loop ' || true
      show "$OUT/loop-shared.json" loop-shared ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
