#!/usr/bin/env bash
# On one GPU of a GPU machine: the 20-trial grid (bench_sweep.py defaults) submitted to a running Ray cluster
# (`ray start --head`) with --keep-workers and a shared --cache-dir, twice, then the one-process API loop on the
# same GPU for comparison. Each step writes RESULT json to $OUT (default /tmp/kept). Expects the random-weight 3B
# at $MODEL (scripts/bench/gpu_setup.py writes it) and ModelOpt's extensions already built.
#
#   MODEL=/tmp/qwen3b OUT=/tmp/kept bash scripts/bench/run_kept_workers.sh
set -euo pipefail
MODEL=${MODEL:-/tmp/qwen3b}
OUT=${OUT:-/tmp/kept}
CAPTIONS=${CAPTIONS:-$MODEL/bench_captions.txt}
WORK=${WORK:-/tmp/kept-work}
mkdir -p "$OUT" "$WORK"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
bench() { python3 scripts/bench/bench_sweep.py "$@" --model-dir "$MODEL" --captions-path "$CAPTIONS"; }
t=$(date +%s)
python3 -m ray.scripts.scripts start --head --num-gpus=1 --num-cpus=16 --disable-usage-stats > "$WORK/ray_start.log" 2>&1
echo "ray start: $(( $(date +%s) - t )) s" | tee "$OUT/ray_start.txt"
trap 'python3 -m ray.scripts.scripts stop > /dev/null 2>&1 || true' EXIT
for name in kept-first kept-second; do
  bench sweep --address auto --keep-workers --cache-dir "$WORK/cache" --name "$name" --work "$WORK/$name" \
    --json-out "$OUT/$name.json" > "$WORK/$name.log" 2>&1 || { tail -20 "$WORK/$name.log"; exit 1; }
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], round(d['wall_s'],1), 's end to end,', round(d['after_ray_start_s'],1), 's after connecting, passes', d['scoring_passes'], 'peak GiB', round(d['gpu_peak_gib'] or 0,1))" "$OUT/$name.json" "$name"
done
python3 -m auto_quantize_model.cli release-workers --address auto | tee "$OUT/release.txt"
python3 -m ray.scripts.scripts stop > /dev/null 2>&1 || true
bench api-loop --name api-loop --work "$WORK/api-loop" --json-out "$OUT/api-loop.json" > "$WORK/api-loop.log" 2>&1 \
  || { tail -20 "$WORK/api-loop.log"; exit 1; }
python3 -c "import json; d=json.load(open('$OUT/api-loop.json')); print('api-loop', round(d['wall_s'],1), 's end to end, passes', d['scoring_passes'])"
