#!/usr/bin/env python3
"""The exact layer selection against ModelOpt's own PuLP/CBC solve, on synthetic instances shaped like real searches.

    python scripts/bench/bench_selection.py [--instances 10] [--json-out docs/bench-results/cpu_selection.json]

Shapes (seeded; costs are the real weight counts x bits / 16, scores synthetic):
- ``3b_fp8``: Qwen2.5-VL-3B's language model, 36 blocks x {q/k/v, o, gate/up, down} + lm_head = 145 groups,
  FP8 / NONE, budgets 15, 14, 12, 10, 9 bits;
- ``3b_int4_fp8``: the same groups with INT4 / FP8 / NONE, budgets 14, 12, 10, 8, 6 bits;
- ``vlm_fp8``: the whole VLM, the 145 language groups plus 32 vision blocks x {qkv, proj, gate/up, down}, the patch
  embedding and the merger's two Linears = 276 groups, FP8 / NONE, budgets 15, 14, 12, 10, 9 bits.

Scores: each group's FP8 score log-normal around a base scale (one decade of spread), INT4's 3-30x FP8's, then
ModelOpt's clamp (non-increasing, NONE last at 0). Every instance is solved at base scales 1e-9, 1e-6, 1e-3, 1 and
1e3 (the same instance, every score multiplied): AutoQuant's scores are 1e-7..1e-5 on the tiny demo model and about
1e-6 for vision groups on the 3B. Per solve: the exact solver's wall time, its time once more in process CPU
time (the machine may be shared), its states, ModelOpt's choice computed its way (``run_search_with_stats`` of its
gradient searcher: LPS/CBC with its retry lower bounds), its wall time (PuLP and the CBC subprocess), status,
whether its choice is worse than the exact one and by how much (relative score gap), whether it is over budget.
Scale invariance: whether each solver's choice is the same at every scale of one instance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

H, INTER, KV, VOCAB = 2048, 11008, 256, 151936  # Qwen2.5-VL-3B language model
VH, VI, PATCH, MERGE = 1280, 3420, 1176, 5120  # its vision tower
LM_GROUPS = {"qkv": H * (H + 2 * KV), "o": H * H, "gate_up": 2 * H * INTER, "down": INTER * H}
VISION_GROUPS = {"qkv": VH * 3 * VH, "proj": VH * VH, "gate_up": 2 * VH * VI, "down": VI * VH}
SHAPES = {
    "3b_fp8": ((8.0, 16.0), (15.0, 14.0, 12.0, 10.0, 9.0), False),
    "3b_int4_fp8": ((4.0, 8.0, 16.0), (14.0, 12.0, 10.0, 8.0, 6.0), False),
    "vlm_fp8": ((8.0, 16.0), (15.0, 14.0, 12.0, 10.0, 9.0), True),
}
SCALES = (1e-9, 1e-6, 1e-3, 1.0, 1e3)


def groups(whole_vlm: bool) -> list[tuple[str, int]]:
    """(name, weight count) per search group."""
    out = [(f"lm.{b}.{k}", n) for b in range(36) for k, n in LM_GROUPS.items()] + [("lm_head", VOCAB * H)]
    if whole_vlm:
        out += [(f"vision.{b}.{k}", n) for b in range(32) for k, n in VISION_GROUPS.items()]
        out += [("patch_embed", PATCH * VH), ("merger.0", MERGE * MERGE), ("merger.2", MERGE * H)]
    return out


def instance(seed: int, bits: tuple[float, ...], whole_vlm: bool) -> dict[str, dict[str, Any]]:
    """ModelOpt-shaped candidate stats at base scale 1 (formats most aggressive first, NONE last)."""
    rng = random.Random(seed)
    stats = {}
    for name, numel in groups(whole_vlm):
        fp8 = 10 ** rng.gauss(0.0, 1.0)
        raw = [fp8 * 10 ** rng.uniform(0.5, 1.5), fp8] if len(bits) == 3 else [fp8]
        scores, prev = [], math.inf
        for x in [*raw, 0.0]:
            prev = min(prev, x)
            scores.append(prev)
        stats[name] = {"formats": [f"{b:g}-bit" for b in bits[:-1]] + ["NONE"], "scores": scores,
                       "costs": [numel * b / 16 for b in bits], "uncompressed_cost": float(numel)}
    return stats


def scaled(stats: dict[str, dict[str, Any]], factor: float) -> dict[str, dict[str, Any]]:
    return {k: {**v, "scores": [s * factor for s in v["scores"]]} for k, v in stats.items()}


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {"n": len(v), "median": statistics.median(v), "p90": v[int(0.9 * (len(v) - 1))], "max": v[-1],
            "mean": statistics.fmean(v)}


def exact_cpu_seconds(stats: dict[str, dict[str, Any]], target: float) -> float:
    """The exact solve once more, timed in this process's CPU time (the machine is shared: wall times have a tail
    of descheduling that CPU time has not)."""
    from auto_quantize_model.autoquant.selection import Problem, solve
    from auto_quantize_model.autoquant.solve import cap_of, denominator_of

    denom = denominator_of(stats)
    problem = Problem.from_candidate_stats(stats, cap_of(denom, target), denom)
    t = time.process_time()
    solve(problem)
    return time.process_time() - t


def run_shape(name: str, instances: int) -> dict[str, Any]:
    from auto_quantize_model.autoquant.solve import solve_state

    bits, budgets, whole_vlm = SHAPES[name]
    rows = []
    for seed in range(instances):
        base = instance(seed, bits, whole_vlm)
        for target in budgets:
            per_scale = []
            for scale in SCALES:
                state = {"method": "gradient", "candidate_stats": scaled(base, scale)}
                record = solve_state(state, target)["selection"]
                sel, mo = record.selection, record.modelopt
                per_scale.append({
                    "scale": scale, "exact_s": sel.seconds, "exact_cpu_s": exact_cpu_seconds(state["candidate_stats"],
                                                                                             target),
                    "nodes": sel.nodes, "optimal": sel.optimal,
                    "exact_choice": sel.choice, "cbc_s": mo.seconds, "cbc_status": mo.status,
                    "cbc_choice": mo.choice, "cbc_differs": mo.differs, "cbc_within_budget": mo.within_budget,
                    "cbc_relative_gap": mo.relative_score_gap, "cbc_differing_groups": len(mo.differing_groups),
                })
            exact_same = len({r["exact_choice"] for r in per_scale}) == 1
            cbc_same = len({r["cbc_choice"] for r in per_scale}) == 1
            for r in per_scale:
                del r["exact_choice"], r["cbc_choice"]
            rows.append({"seed": seed, "target_bits": target, "groups": len(base),
                         "exact_same_at_every_scale": exact_same, "cbc_same_at_every_scale": cbc_same,
                         "solves": per_scale})
        logging.info("%s: instance %d done", name, seed)
    solves = [s for r in rows for s in r["solves"]]
    by_scale = {}
    for scale in SCALES:
        ss = [s for s in solves if s["scale"] == scale]
        worse = [s for s in ss if s["cbc_differs"] and s["cbc_within_budget"] and (s["cbc_relative_gap"] or 0) > 0]
        by_scale[f"{scale:g}"] = {
            "solves": len(ss), "cbc_worse": len(worse), "cbc_over_budget": sum(not s["cbc_within_budget"] for s in ss),
            "cbc_status": {st: sum(s["cbc_status"] == st for s in ss) for st in sorted({s["cbc_status"] for s in ss})},
            "cbc_relative_gap_when_worse": summary([s["cbc_relative_gap"] for s in worse]),
        }
    return {
        "groups": rows[0]["groups"], "candidates": len(bits), "budgets": list(budgets), "instances": instances,
        "exact_seconds": summary([s["exact_s"] for s in solves]),
        "exact_cpu_seconds": summary([s["exact_cpu_s"] for s in solves]),
        "exact_nodes": summary([s["nodes"] for s in solves]),
        "exact_proven_optimal": sum(s["optimal"] for s in solves), "solves": len(solves),
        "cbc_seconds": summary([s["cbc_s"] for s in solves]), "by_scale": by_scale,
        "exact_same_choice_at_every_scale": sum(r["exact_same_at_every_scale"] for r in rows),
        "cbc_same_choice_at_every_scale": sum(r["cbc_same_at_every_scale"] for r in rows), "problems": len(rows),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=10, help="seeded score vectors per shape")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import pulp

    from auto_quantize_model.autoquant.selection import SOLVER_VERSION

    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "bench": "selection", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "pulp": pulp.__version__, "solver_version": SOLVER_VERSION,
        "scales": list(SCALES), "shapes": {},
    }
    for name in args.shapes.split(","):
        res["shapes"][name] = run_shape(name, args.instances)
    res["wall_s"] = time.perf_counter() - t0
    for name, s in res["shapes"].items():
        short = {k: v for k, v in s.items() if k != "rows"}
        print("RESULT " + json.dumps({"shape": name, **short}), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
