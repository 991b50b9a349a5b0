#!/usr/bin/env bash
# Every GPU measurement of a round as one pipeline on one machine, detached so it can outlive one device call (a
# call may run 10 minutes; the pipeline runs about 25). Each step writes its JSON and log under $R; a step that fails
# is recorded and the next one runs.
#
#   bash scripts/bench/gpu_round.sh start        # copy the repo to /tmp/aqrepo, unpack .devdeps, start the pipeline
#   bash scripts/bench/gpu_round.sh wait 540     # wait up to 540 s for it to end; pack $R into $OUT/round.tgz
#
# STEPS (default below) picks and orders the steps; MODEL is the random-weight full-size 3B it writes and measures.
set -uo pipefail
R=${R:-/tmp/round}
REPO=/tmp/aqrepo
DEPS=/opt/aqdeps
MODEL=${MODEL:-/tmp/qwen3b}
STEPS=${STEPS:-setup sweeps export_all_fp8 load_warm gpu_tests sweeps_extra load_cold export_top50}

step() {  # name, command...: run it, log it, record its wall time and status
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "$(date -u +%H:%M:%S) start $name" >> "$R/steps.txt"
  if "$@" > "$R/$name.log" 2>&1; then st=ok; else st="failed($?)"; fi
  echo "$(date -u +%H:%M:%S) end $name $st $(( $(date +%s) - t0 )) s" >> "$R/steps.txt"
}

run_pipeline() {
  cd "$REPO" || exit 1
  export PYTHONPATH="$DEPS:$REPO" RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$R/gpu.txt" 2>&1
  for s in $STEPS; do
    case $s in
      setup)  # checkpoint written beside the extension builds; gpu_setup skips it once config.json exists
        step setup bash -c "python3 scripts/bench/make_full_size_checkpoint.py --output-dir $MODEL > $R/checkpoint.log 2>&1 &
          python3 scripts/bench/gpu_setup.py --model-dir $MODEL --no-checkpoint --formats INT8_DEFAULT_CFG,INT4_BLOCKWISE_WEIGHT_ONLY_CFG,FP8_DEFAULT_CFG; wait" ;;
      setup_fp8)  # the checkpoint and ModelOpt's FP8 extension only (enough for export_lite and diag_export)
        step setup_fp8 bash -c "python3 scripts/bench/make_full_size_checkpoint.py --output-dir $MODEL > $R/checkpoint.log 2>&1 &
          python3 scripts/bench/gpu_setup.py --model-dir $MODEL --no-checkpoint --formats FP8_DEFAULT_CFG; wait" ;;
      load_warm)
        step load_warm python3 scripts/bench/bench_load.py --model-dir "$MODEL" --device cuda --repeats 1 \
          --json-out "$R/h100_load_warm.json" ;;
      load_cold)
        step load_cold python3 scripts/bench/bench_load.py --model-dir "$MODEL" --device cuda --repeats 1 --cold \
          --fresh-fingerprint --no-check --json-out "$R/h100_load_cold.json" ;;
      export_lite)  # all_fp8 only, without the speed measurements: the correctness figures and the diag's inputs
        step export_lite python3 scripts/bench/bench_fp8_export.py --model-dir "$MODEL" --work-dir /tmp/fp8bench-both \
          --schemes all_fp8 --no-speed --output "$R/h100_fp8_export_lite.json" ;;
      export_both)  # both schemes in one process: one load, one BF16 baseline for the speed ratios
        step export_both python3 scripts/bench/bench_fp8_export.py --model-dir "$MODEL" --work-dir /tmp/fp8bench-both \
          --schemes all_fp8,top50 --output "$R/h100_fp8_export_both.json" ;;
      diag_export)  # after export_both: each operand of the layers round five found off (docs/benchmarks.md)
        step diag_export python3 scripts/bench/diag_fp8_layer.py --model-dir "$MODEL" \
          --run-dir /tmp/fp8bench-both/all_fp8 --export-dir /tmp/fp8bench-both/export_all_fp8 \
          --captions "$MODEL/bench_captions.txt" --output "$R/h100_diag_fp8_layers.json" \
          --layers model.layers.23.self_attn.o_proj,model.layers.25.self_attn.o_proj,model.layers.28.mlp.gate_proj,lm_head,model.layers.5.mlp.down_proj,model.layers.18.mlp.down_proj ;;
      export_all_fp8|export_top50)
        step "$s" python3 scripts/bench/bench_fp8_export.py --model-dir "$MODEL" --work-dir "/tmp/fp8bench-$s" \
          --schemes "${s#export_}" --output "$R/h100_fp8_$s.json" ;;
      sweeps)  # the first sweep against the strongest single process, then kept workers (first and repeat)
        step sweeps env MODEL="$MODEL" OUT="$R/kept" STEPS="session sweep kept report" \
          bash scripts/bench/run_kept_workers.sh ;;
      sweeps_one_gpu)  # the first sweep against the session: 1 worker, 2 workers sharing the GPU, direct scheduler
        step sweeps_one_gpu env MODEL="$MODEL" OUT="$R/kept" STEPS="session sweep sweep2 sweep-direct" \
          bash scripts/bench/run_kept_workers.sh ;;
      sweeps_kept)  # kept workers alone: the first sweep on a running cluster, then the repeat
        step sweeps_kept env MODEL="$MODEL" OUT="$R/kept" STEPS="kept" bash scripts/bench/run_kept_workers.sh ;;
      sweeps_extra)  # the weaker baselines: the shared-cache CLI loop, the one-process API loop
        step sweeps_extra env MODEL="$MODEL" OUT="$R/kept" STEPS="loop api report" \
          bash scripts/bench/run_kept_workers.sh ;;
      gpu_tests)
        step gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_kept_workers.py -k pinned ;;
      *) echo "unknown step $s" >> "$R/steps.txt" ;;
    esac
  done
  touch "$R/DONE"
}

case ${1:-} in
  start)
    mkdir -p "$R" && rm -f "$R/DONE"
    [ -d "$DEPS/ray" ] || { mkdir -p "$DEPS" && tar -xJf .devdeps/site.tar.xz -C "$DEPS"; }
    rm -rf "$REPO" && mkdir -p "$REPO" && tar --exclude=./.devdeps --exclude=./.git -cf - . | tar -xf - -C "$REPO"
    setsid nohup bash "$REPO/scripts/bench/gpu_round.sh" run > "$R/pipeline.log" 2>&1 < /dev/null &
    echo "pipeline started: $R" ;;
  run) run_pipeline ;;
  wait)
    limit=${2:-540}; t=0
    while [ ! -f "$R/DONE" ] && [ "$t" -lt "$limit" ]; do sleep 5; t=$((t + 5)); done
    cat "$R/steps.txt" 2>/dev/null
    [ -f "$R/DONE" ] && echo "pipeline DONE" || echo "pipeline still running after ${t} s"
    [ -n "${OUT:-}" ] && tar -czf "$OUT/round.tgz" -C "$(dirname "$R")" "$(basename "$R")" ;;
  *) echo "usage: $0 start | wait SECONDS" >&2; exit 2 ;;
esac
