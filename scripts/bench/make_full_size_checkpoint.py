#!/usr/bin/env python3
"""Write a full-size Qwen2.5-VL-3B checkpoint with random weights (the real config; no download).

Built on the GPU in bf16, saved with save_pretrained beside the tiny model's tokenizer (its ids fit
the 151,936-row embedding), so it loads through exactly the same path as the real checkpoint.
Also writes long calibration "captions" (demo captions joined ~14 at a time, ~250 tokens each) so
batches are 4 x ~256 tokens, the size the engine notes were measured at.

    python scripts/bench/make_full_size_checkpoint.py --output-dir /tmp/qwen3b-random

``--text-layers N`` / ``--vision-depth N`` keep the full widths but fewer blocks (a CPU-sized stand-in for load
benchmarks: the 3B's embedding and layer shapes, a fraction of its bytes).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch

from auto_quantize_model.datasets.demo import demo_captions
from auto_quantize_model.models.tiny import (
    QWEN2_5_VL_3B_CONFIG,
    SPECIAL_TOKENS,
    make_tiny_checkpoint,
    with_special_token_ids,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-layers", type=int, default=None, help="fewer decoder layers (full width)")
    p.add_argument("--vision-depth", type=int, default=None, help="fewer vision blocks (full width)")
    args = p.parse_args()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(args.output_dir)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_checkpoint(Path(tmp) / "tiny", train_steps=0)
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        tok = AutoTokenizer.from_pretrained(tiny)
        # Qwen2.5-VL's published preprocessor limits (the tiny model's are shrunk).
        improc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
        chat = (tiny / "chat_template.jinja").read_text()
    cfg = with_special_token_ids(copy.deepcopy(QWEN2_5_VL_3B_CONFIG),
                                 {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})
    if args.text_layers:
        cfg.update(num_hidden_layers=args.text_layers, max_window_layers=args.text_layers)
    if args.vision_depth:
        cfg["vision_config"].update(depth=args.vision_depth,
                                    fullatt_block_indexes=[i for i in cfg["vision_config"]["fullatt_block_indexes"]
                                                           if i < args.vision_depth] or [args.vision_depth - 1])
    torch.manual_seed(args.seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).to(torch.bfloat16)
    built = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    (out / "chat_template.jinja").write_text(chat)
    caps = demo_captions()
    long = [" ".join(caps[i:i + 14]) for i in range(0, len(caps) - 14, 7)]
    (out / "bench_captions.txt").write_text("\n".join(long) + "\n")
    n = sum(p.numel() for p in model.parameters())
    print(f"full-size Qwen2.5-VL-3B (random): {n / 1e9:.3f} B params, built {built:.1f}s, saved in "
          f"{time.perf_counter() - t - built:.1f}s to {out}; {len(long)} long captions")


if __name__ == "__main__":
    main()
