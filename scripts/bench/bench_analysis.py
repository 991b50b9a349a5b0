#!/usr/bin/env python3
"""Benchmark: aggregate N manifests of a 36-block (Qwen2.5-VL-3B-shaped) LM into the Parquet tables.

Manifests are generated here (seeded): real 3B layer shapes, random sensitivity scores, a greedy
FP8/BF16 choice per budget. They pass the manifest validator, so the timed path is exactly the one
`autoquant analyze` runs.

    python scripts/bench/bench_analysis.py --num-manifests 1000 --workdir /tmp/bench_analysis
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from pathlib import Path

from auto_quantize_model.analysis.aggregate import aggregate
from auto_quantize_model.analysis.readers import load_layers, load_trials
from auto_quantize_model.analysis.report import analyze
from auto_quantize_model.autoquant.manifest import SCHEMA_VERSION, validate_manifest

H, FFN, KV, VOCAB, BLOCKS = 2048, 11008, 256, 151936, 36
SHAPES = {"q_proj": H * H, "k_proj": KV * H, "v_proj": KV * H, "o_proj": H * H,
          "gate_proj": FFN * H, "up_proj": FFN * H, "down_proj": H * FFN}
SUB = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
       "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
KIND = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
        "down_proj": "down"}


def groups() -> dict[str, list[tuple[str, str, int | None, int]]]:
    out: dict[str, list[tuple[str, str, int | None, int]]] = {}
    for b in range(BLOCKS):
        for leaf, n in SHAPES.items():
            name = f"model.layers.{b}.{SUB[leaf]}.{leaf}"
            g = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(leaf, leaf)
            out.setdefault(f"model.layers.{b}.{SUB[g]}.{g}", []).append((name, KIND[leaf], b, n))
    out["lm_head"] = [("lm_head", "lm_head", None, VOCAB * H)]
    return out


def synthetic_manifest(rng: random.Random, scheme: str, bits: float, seed: int) -> dict:
    layers, sens = {}, {}
    gs = groups()
    scores = {g: 10 ** rng.uniform(-7, -3) for g in gs}
    sizes = {g: sum(m[3] for m in members) for g, members in gs.items()}
    total = sum(sizes.values())
    budget = total * bits / 16
    cost = float(total)
    chosen = {}
    for g in sorted(gs, key=lambda g: scores[g] / sizes[g]):
        if cost - sizes[g] / 2 >= budget - 1e-9 or cost > budget:
            chosen[g] = "FP8_DEFAULT_CFG"
            cost -= sizes[g] / 2
        if cost <= budget:
            break
    for g, members in gs.items():
        fmt = chosen.get(g, "NONE")
        sens[g] = {"candidate_formats": ["FP8_DEFAULT_CFG", "NONE"], "scores": [scores[g], 0.0],
                   "costs": [sizes[g] / 2, float(sizes[g])], "uncompressed_cost": float(sizes[g]),
                   "chosen_format": fmt, "module_names": [m[0] for m in members], "block_index": members[0][2],
                   "kinds": [m[1] for m in members]}
        for name, kind, b, n in members:
            layers[name] = {"dtype": "fp8" if fmt != "NONE" else "bf16", "input_dtype": "fp8" if fmt != "NONE" else "bf16",
                            "format": fmt, "search_group": g, "block_index": b, "kind": kind, "num_params": n,
                            "bits": 8.0 if fmt != "NONE" else 16.0}
    achieved = 16 * cost / total
    return {
        "schema_version": SCHEMA_VERSION, "run_id": f"{scheme}-{bits:g}-{seed}", "sweep_id": "bench",
        "scheme": {"name": scheme, "quantization_formats": ["FP8_DEFAULT_CFG"], "effective_bits": bits,
                   "method": "gradient", "num_score_steps": 16, "num_calib_steps": 16, "disabled_layers": []},
        "model": {"path": "/models/qwen2.5-vl-3b", "architecture": "Qwen2_5_VLForConditionalGeneration",
                  "config_hash": "f" * 64, "parameter_counts": {}},
        "calibration": {"token_hash": f"{seed:064x}", "num_samples": 64, "source_path": "captions.txt"},
        "effective_bits": {"target": bits, "achieved": achieved, "measured": achieved},
        "budget_met": achieved <= bits + 1e-6, "num_quantized_layers": sum(v["dtype"] == "fp8" for v in layers.values()),
        "num_layers": len(layers), "layers": layers, "layer_sensitivity": sens,
        "autoquant_state": {"keys": ["best", "candidate_stats"], "best": {"recipe": chosen, "score": sum(
            scores[g] for g in chosen), "constraints": {"effective_bits": achieved}, "is_satisfied": True}},
        "score_cache": {"key": f"k{seed}", "reused": bits != 14.0}, "timings": {"total": 1.0}, "versions": {},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-manifests", type=int, default=1000)
    p.add_argument("--workdir", default="/tmp/bench_analysis")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(0)
    schemes = ["fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full", "fp8_autoquant_all_layers_fp8"]
    bits = [15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.0]
    t = time.perf_counter()
    for i in range(args.num_manifests):
        scheme, b, seed = schemes[i % 4], bits[(i // 4) % 8], i // 32
        m = synthetic_manifest(rng, scheme, b, seed)
        if i == 0:
            validate_manifest(m)
        d = work / "runs" / f"trial_{i:05d}"
        d.mkdir(parents=True)
        (d / f"{scheme}_quant_manifest.json").write_text(json.dumps(m))
    gen = time.perf_counter() - t
    size = sum(f.stat().st_size for f in (work / "runs").rglob("*.json"))
    t = time.perf_counter()
    agg = aggregate([str(work / "runs")], work / "tables", workers=args.workers)
    t_agg = time.perf_counter() - t
    t = time.perf_counter()
    layers, trials = load_layers(work / "tables"), load_trials(work / "tables")
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    analyze([str(work / "runs")], work / "analysis", workers=args.workers)
    t_analyze = time.perf_counter() - t
    print(f"generated {args.num_manifests} manifests ({size / 1e6:.0f} MB) in {gen:.1f} s")
    print(f"aggregate -> tables: {t_agg:.2f} s ({agg['num_trials']} trials, workers={args.workers})")
    print(f"load_layers + load_trials: {t_read:.2f} s ({len(layers)} layer rows, {len(trials)} trial rows)")
    print(f"full analyze (tables refresh + plots + analysis.md): {t_analyze:.2f} s")


if __name__ == "__main__":
    main()
