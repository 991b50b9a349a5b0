#!/usr/bin/env python3
"""Whole-VLM AutoQuant (fp8_autoquant_all_layers_fp8) with image-caption calibration: time and peak memory.

    python scripts/bench/bench_vlm_all_layers.py --model-dir DIR --image-size 448
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.datasets.demo_images import make_demo_image_captions
from auto_quantize_model.datasets.image_captions import build_image_calibration_set, read_image_captions
from auto_quantize_model.models.loading import load_model
from auto_quantize_model.models.scope import Scope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--bits", type=float, default=12.0)
    p.add_argument("--output-dir", default="/tmp/bench_vlm")
    args = p.parse_args()
    work = tempfile.mkdtemp()
    pairs = make_demo_image_captions(work, n=args.samples, size=args.image_size)
    loaded = load_model(args.model_dir, Scope.WHOLE_VLM)
    t = time.perf_counter()
    cal = build_image_calibration_set(loaded.tokenizer, loaded.image_processor, read_image_captions(str(pairs)),
                                      image_token_id=loaded.model.config.image_token_id, max_samples=args.samples,
                                      batch_size=4, seq_len=2048, device=loaded.device)
    prep = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    scheme = resolve_scheme(get_scheme("fp8_autoquant_all_layers_fp8"), effective_bits=args.bits,
                            num_score_steps=args.steps, num_calib_steps=args.steps)
    t = time.perf_counter()
    m = run_scheme(loaded, cal, scheme, args.output_dir).manifest
    total = time.perf_counter() - t
    zero = [g for g, i in m["layer_sensitivity"].items() if not i["scores"][0] > 0]
    print("RESULT " + json.dumps({
        "device": torch.cuda.get_device_name(), "params": loaded.param_counts["checkpoint_total"],
        "load_s": loaded.load_seconds, "preprocess_s": prep, "autoquant_total_s": total,
        "phases": {k: v for k, v in m["timings"].items() if k in ("calibrate", "score", "solve", "write_restore")},
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tokens_per_batch": cal.num_tokens / len(cal.batches),
        "image_tokens_per_image": cal.num_image_tokens / cal.num_samples, "groups": len(m["layer_sensitivity"]),
        "groups_with_zero_score": zero, "towers": m["towers"], "effective_bits": m["effective_bits"],
        "num_quantized_layers": m["num_quantized_layers"], "num_layers": m["num_layers"],
    }))


if __name__ == "__main__":
    main()
