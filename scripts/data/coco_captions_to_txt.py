#!/usr/bin/env python3
"""Turn COCO caption annotations (captions_train2017.json) into one caption per line.

    python scripts/data/coco_captions_to_txt.py annotations/captions_train2017.json \
        datasets/vlm-quantize-calib/coco2017_captions.txt

Whitespace is collapsed, blank and duplicate captions are dropped (counts are logged), and the output
is written through a temporary file so an interrupted run leaves no half file.
"""

import argparse
import logging
import sys

from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", help="COCO captions_*.json")
    p.add_argument("output", help="text file to write, one caption per line")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        src = read_captions(args.annotations)
        if src.format != "coco_json":
            raise UserError(f"{args.annotations} is not a COCO captions JSON (detected {src.format})")
    except UserError as exc:
        print(f"coco_captions_to_txt: error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, "\n".join(src.captions) + "\n")
    logging.info("wrote %d captions to %s", len(src.captions), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
