#!/usr/bin/env python3
"""AutoQuant FP8 schemes on Qwen2.5-VL-3B's language model: the same flags as `autoquant run`.

    python scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_schemes.py --scheme-name fp8_autoquant_top50 \
        --model-dir /models/Qwen2.5-VL-3B-Instruct --output-dir runs/top50
"""

import argparse
import sys

from auto_quantize_model.cli import add_run_arguments, cmd_run, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="qwen2_5_vl_3b_autoquant_fp8_schemes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_run_arguments(parser)
    parser.set_defaults(func=cmd_run)
    sys.exit(main(parser=parser))
