#!/usr/bin/env python3
"""Evaluation throughput (tokens/s) of the BF16 LM versus the same LM fake-quantized to FP8.

Loads the LM through the normal path, builds evaluation batches from captions, times forward passes
(next-token logits, as `autoquant compare` runs them) for BF16 and for the all-FP8 AutoQuant result.

    python scripts/bench/bench_eval_throughput.py --model-dir DIR --captions-path demo --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.datasets.calibration import build_calibration_set
from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.models.loading import load_language_model
from auto_quantize_model.models.steps import language_model_logits as forward_step


def tokens_per_second(model, batches, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.no_grad():
        forward_step(model, batches[0])  # warm-up (kernels, caches)
        sync()
        t = time.perf_counter()
        n = 0
        for _ in range(repeats):
            for b in batches:
                forward_step(model, b)
                n += int(b["attention_mask"].sum())
        sync()
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--captions-path", default="demo")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-dir", default="/tmp/bench_eval")
    args = p.parse_args()
    loaded = load_language_model(args.model_dir)
    data = build_calibration_set(loaded.tokenizer, read_captions(args.captions_path), max_samples=args.num_samples,
                                 batch_size=args.batch_size, seq_len=args.seq_len, device=loaded.device)
    bf16 = tokens_per_second(loaded.model, data.batches, args.repeats)
    scheme = resolve_scheme(get_scheme("fp8_autoquant_full"), num_score_steps=4, num_calib_steps=4)
    fp8_model = run_scheme(loaded, data, scheme, args.output_dir).model
    fp8 = tokens_per_second(fp8_model, data.batches, args.repeats)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res = {"device": dev, "dtype": str(loaded.dtype), "tokens_per_batch": data.num_tokens / len(data.batches),
           "bf16_tokens_per_s": bf16, "fp8_fake_quant_tokens_per_s": fp8, "fp8_over_bf16": fp8 / bf16}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
