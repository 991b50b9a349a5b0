#!/usr/bin/env python3
"""Before timing on a fresh GPU machine: build ModelOpt's FP8 extension, warm the formats' fake quantization and
their facts (``format_facts.py``), and write the full-size random-weight 3B checkpoint
(``make_full_size_checkpoint.py``) unless it is there. Prints what each took.

    python scripts/bench/gpu_setup.py --model-dir /tmp/qwen3b
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FACT_FORMATS = ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "INT8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--formats",
                   default="NVFP4_DEFAULT_CFG,INT8_DEFAULT_CFG,INT4_BLOCKWISE_WEIGHT_ONLY_CFG,FP8_DEFAULT_CFG",
                   help="formats whose kernels to warm (INT8's extension build takes ~55 s on a fresh H100)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="do not write the checkpoint (another process writes it meanwhile, as gpu_round.sh does)")
    args = p.parse_args()
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

    out = {"device": torch.cuda.get_device_name()}
    t = time.perf_counter()
    get_cuda_ext_fp8()
    out["fp8_extension_s"] = time.perf_counter() - t
    # First use of a format's fake-quant kernels compiles them (Triton/extensions): do it here, not in a timing.
    for name in args.formats.split(","):
        t = time.perf_counter()
        lin = torch.nn.Sequential(torch.nn.Linear(256, 256)).cuda().to(torch.bfloat16)
        x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        mtq.quantize(lin, getattr(mtq, name), forward_loop=lambda m, x=x: m(x))
        lin(x).float().sum().backward()
        torch.cuda.synchronize()
        out[f"warmup_{name}_s"] = time.perf_counter() - t
    # Each format's bits, signature and disables, remembered for the sweep driver's preflight (format_facts.py), as
    # any first run on the machine leaves them: the driver then resolves schemes without importing ModelOpt.
    from auto_quantize_model.format_facts import format_facts

    t = time.perf_counter()
    # Facts need no kernels: warm every format the bench grids name, NVFP4 too (its kernels are warmed only on ask).
    for name in dict.fromkeys([*args.formats.split(","), *FACT_FORMATS]):
        format_facts(name)
    out["format_facts_s"] = time.perf_counter() - t
    if not args.no_checkpoint and not (Path(args.model_dir) / "config.json").exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_full_size_checkpoint.py")), "--output-dir",
                        args.model_dir], check=True)
        out["checkpoint_s"] = time.perf_counter() - t
    print("SETUP " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
