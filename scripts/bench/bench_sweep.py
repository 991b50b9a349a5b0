#!/usr/bin/env python3
"""Sweep versus the single-run driver once per trial, on the same grid and machine.

    # naive loop: a fresh `autoquant run` process per trial (load + calibrate + score + solve + write)
    python scripts/bench/bench_sweep.py loop  --model-dir DIR --captions-path C --schemes A,B --bits 14,12 [--limit N]
    # the sweep: one worker per GPU, shared scoring, Ray Tune
    python scripts/bench/bench_sweep.py sweep --model-dir DIR --captions-path C --schemes A,B --bits 14,12 --num-workers 1

Both print one JSON line with wall time and the per-phase split; `--limit` times only the first N loop
trials (the JSON says how many, and the per-trial mean).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def loop(args: argparse.Namespace) -> dict:
    grid = [(s, b) for s in args.schemes.split(",") for b in args.bits.split(",")]
    timed = grid[: args.limit] if args.limit else grid
    per = []
    for scheme, bits in timed:
        out = Path(args.work) / "loop" / f"{scheme}-{bits}"
        cmd = [sys.executable, "-m", "auto_quantize_model.cli", "run", "--scheme-name", scheme, "--model-dir",
               args.model_dir, "--output-dir", str(out), "--captions-path", args.captions_path, "--effective-bits", bits,
               "--max-calib-samples", str(args.samples), "--batch-size", "4", "--calib-seq-len", "256",
               "--num-score-steps", str(args.steps), "--num-calib-steps", str(args.steps)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        per.append(time.perf_counter() - t)
        m = json.loads(next(out.glob("*_quant_manifest.json")).read_text())
        print(f"loop {scheme} {bits}: {per[-1]:.1f}s (load {m['timings']['load']:.1f}, calibrate "
              f"{m['timings']['calibrate']:.1f}, score {m['timings']['score']:.1f}, solve {m['timings']['solve']:.2f})",
              flush=True)
    mean = statistics.mean(per)
    return {"mode": "loop", "grid_trials": len(grid), "timed_trials": len(per), "per_trial_mean_s": mean,
            "per_trial_s": per, "timed_wall_s": sum(per), "projected_wall_s": mean * len(grid)}


def sweep(args: argparse.Namespace) -> dict:
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import load_sweep_spec

    steps = tuple(int(s) for s in args.score_steps.split(",")) if args.score_steps else (args.steps,)
    spec = load_sweep_spec(None, {
        "name": args.name, "model_dir": args.model_dir, "storage_path": str(Path(args.work) / "sweeps"),
        "captions_path": args.captions_path, "schemes": tuple(args.schemes.split(",")),
        "effective_bits": tuple(float(b) for b in args.bits.split(",")), "num_score_steps": steps,
        "num_calib_steps": args.steps, "max_calib_samples": args.samples, "batch_size": 4, "calib_seq_len": 256,
        "num_workers": args.num_workers, "worker": {"num_gpus": args.worker_gpus, "num_cpus": 2, "pristine": args.pristine},
    })
    t = time.perf_counter()
    res = run_sweep(spec)
    wall = time.perf_counter() - t
    ok = [r for r in res["rows"] if r.get("status") == "ok"]
    split = {k: sum(r.get(k) or 0.0 for r in ok) for k in
             ("time_restore", "time_calibrate", "time_score", "time_solve", "time_write", "time_trial")}
    loads = sorted({(r["worker"], r["worker_load_seconds"]) for r in ok})
    return {"mode": "sweep", "trials": len(res["rows"]), "ok": len(ok), "num_workers": res["num_workers"],
            "wall_s": wall, "sweep_wall_s": res["wall_seconds"], "scoring_passes": res["stats"]["passes"],
            "reuses": res["stats"]["reuses"], "worker_load_s": [x[1] for x in loads], "sum_over_trials_s": split,
            "gpu_peak_gib": max((r.get("gpu_peak_bytes") or 0) for r in ok) / 2**30 if ok else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("loop", "sweep"))
    p.add_argument("--model-dir", required=True)
    p.add_argument("--captions-path", required=True)
    p.add_argument("--schemes", default="fp8_autoquant_top25,fp8_autoquant_top50,fp8_autoquant_full,"
                                        "fp8_autoquant_all_layers_fp8")
    p.add_argument("--bits", default="15,14,12,10,8")
    p.add_argument("--score-steps", default=None, help="sweep only: comma list, one scoring key each")
    p.add_argument("--steps", type=int, default=16, help="calibration (and default scoring) steps")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--pristine", default="auto")
    p.add_argument("--worker-gpus", type=float, default=1.0, help="GPU share per worker (0.5 = two per GPU)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--name", default="bench")
    p.add_argument("--work", default="/tmp/bench_sweep")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    res = loop(args) if args.mode == "loop" else sweep(args)
    import torch

    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res["gpus"] = torch.cuda.device_count()
    line = json.dumps(res)
    print("RESULT " + line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()
