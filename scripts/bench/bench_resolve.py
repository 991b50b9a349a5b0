#!/usr/bin/env python3
"""Where a re-solve's time goes, on CPU: in memory, from the search cache, and back to a parked search.

    python scripts/bench/bench_resolve.py --model-dir /tmp/tiny [--layers 36] [--json-out OUT.json]

``--layers N`` first writes a deeper copy of the checkpoint (decoder layer 0's weights repeated to N layers; the
3B has 36) so that ModelOpt's per-module work has the 3B's module count; its weights are then not trained ones.
Calibration: the demo's sizes (64 demo captions, batch 4, length 64, 16 + 16 steps). Two schemes with different
scoring keys (``fp8_autoquant_full``, ``int4w_fp8_autoquant_mix``) are searched once into a cache, then timed:

- ``in_memory``: ``resolve_budget`` on the searched model, per budget, split into the exact solve, ModelOpt's
  own solve kept for comparison (CBC), activating the choice, and writing (restore artifact, report, manifest);
- ``cache``: ``run_scheme`` with the cache (what a new process or another key pays): the model copy, ModelOpt's
  ``auto_quantize(checkpoint=...)`` (model conversion, quantizer insertion, checkpoint load and restore, the solve,
  the fold) and the writes;
- ``alternating``: one ``SearchSession`` running the two schemes in turn at several budgets, with parking of
  searched models (default) and without (``MAX_PARKED = 0``: every switch of key is a cache re-solve, as before).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

SCHEMES = ("fp8_autoquant_full", "int4w_fp8_autoquant_mix")
BUDGETS = (14.0, 12.0, 10.0, 9.0)


def deeper_checkpoint(src: Path, dst: Path, layers: int) -> Path:
    """``src`` with its language model's decoder layer 0 repeated to ``layers`` layers."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg["text_config"]
    text.update(num_hidden_layers=layers, layer_types=["full_attention"] * layers, max_window_layers=layers)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = load_file(dst / "model.safetensors")
    first = {k: v for k, v in weights.items() if k.startswith("model.layers.0.")}
    for i in range(1, layers):
        weights.update({k.replace("model.layers.0.", f"model.layers.{i}."): v.clone() for k, v in first.items()})
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def split(m: dict[str, Any], total: float) -> dict[str, float]:
    """One re-solve's seconds by part, from its manifest and the wall time around the call."""
    t, sel = m["timings"], m["selection"]
    exact, cbc = sel["seconds"], sel["modelopt"]["seconds"]
    out = {"total": total, "copy_model": t.get("copy_model") or 0.0, "solve_phase": t["solve"], "exact_solve": exact,
           "modelopt_cbc": cbc, "write_restore": t.get("write_restore", 0.0)}
    out["solve_phase_rest"] = out["solve_phase"] - exact - cbc  # conversion, restore, fold (cache); activate (memory)
    out["manifest_report_rest"] = total - out["copy_model"] - out["solve_phase"] - out["write_restore"]
    return out


def mean_parts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--layers", type=int, default=0, help="repeat decoder layer 0 to this many layers first")
    p.add_argument("--workdir", default="/tmp/bench_resolve")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import auto_quantize_model.autoquant.session as session_mod
    from auto_quantize_model.autoquant.run import resolve_budget, run_scheme
    from auto_quantize_model.configs.schemes import get_scheme, resolve_scheme
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.models.loading import load_language_model

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = Path(args.model_dir)
    if args.layers:
        model_dir = deeper_checkpoint(model_dir, work / f"model-{args.layers}-layers", args.layers)
    loaded = load_language_model(model_dir, device="cpu")
    calib = build_calibration_set(loaded.tokenizer, read_captions("demo"), max_samples=64, batch_size=4, seq_len=64,
                                  seed=0)
    cache = work / "cache"
    schemes = {n: resolve_scheme(get_scheme(n), effective_bits=16.0) for n in SCHEMES}
    res: dict[str, Any] = {
        "bench": "resolve", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.node(), "cpus": os.cpu_count(), "model_dir": str(args.model_dir), "layers": args.layers
        or None, "weights": "tiny demo checkpoint" + (f", decoder layer 0 repeated to {args.layers} layers"
                                                       if args.layers else ""),
        "searchable_modules": None, "in_memory": {}, "cache": {}, "alternating": {},
    }
    searched = {}
    for name, s in schemes.items():
        t = time.perf_counter()
        searched[name] = run_scheme(loaded, calib, dataclasses.replace(s, effective_bits=14.0), work / f"{name}-first",
                                    cache_dir=cache)
        res.setdefault("first_search_s", {})[name] = time.perf_counter() - t
    res["searchable_modules"] = searched[SCHEMES[0]].manifest["num_layers"]
    for name, s in schemes.items():
        rows, prev = [], searched[name]
        for bits in BUDGETS:
            t = time.perf_counter()
            prev = resolve_budget(prev, loaded, calib, dataclasses.replace(s, effective_bits=bits),
                                  work / f"{name}-mem-{bits:g}")
            rows.append(split(prev.manifest, time.perf_counter() - t))
        res["in_memory"][name] = {"mean": mean_parts(rows), "per_budget": rows}
        del prev
        rows = []
        for bits in BUDGETS:
            t = time.perf_counter()
            r = run_scheme(loaded, calib, dataclasses.replace(s, effective_bits=bits), work / f"{name}-cache-{bits:g}",
                           cache_dir=cache)
            rows.append(split(r.manifest, time.perf_counter() - t))
            del r
        res["cache"][name] = {"mean": mean_parts(rows), "per_budget": rows}
    del searched
    for label, parked in (("parking", session_mod.MAX_PARKED), ("no_parking", 0)):
        session_mod.MAX_PARKED = parked
        session = session_mod.SearchSession(loaded, calib, cache)
        runs = []
        for i, bits in enumerate(BUDGETS * 2):
            name = SCHEMES[i % 2]
            t = time.perf_counter()
            r = session.run(dataclasses.replace(schemes[name], effective_bits=bits), work / f"{label}-{i}")
            runs.append({"scheme": name, "bits": bits, "seconds": time.perf_counter() - t,
                         "copy_s": session.last_copy_seconds,
                         "in_memory": bool(r.manifest["score_cache"].get("in_memory"))})
        # The first visit of each key is a cache re-solve either way; the rest show the difference.
        later = [r["seconds"] for r in runs[2:]]
        res["alternating"][label] = {"runs": runs, "mean_after_first_visits_s": statistics.fmean(later),
                                     "total_s": sum(r["seconds"] for r in runs)}
        del session
    line = json.dumps(res)
    short = {k: v for k, v in res.items() if k not in ("in_memory", "cache", "alternating")}
    short["in_memory"] = {k: v["mean"] for k, v in res["in_memory"].items()}
    short["cache"] = {k: v["mean"] for k, v in res["cache"].items()}
    short["alternating"] = {k: {"mean_after_first_visits_s": v["mean_after_first_visits_s"], "total_s": v["total_s"]}
                            for k, v in res["alternating"].items()}
    print("RESULT " + json.dumps(short), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()
