"""Run apart from the test process, with the deployment side's transformers first on the path (``.venv/consumer``,
scripts/consumer-requirements.txt): load a compressed-tensors export with plain ``from_pretrained`` and compare its
logits with the evaluated model's, saved by the test.

    python tests/consumer_load.py EXPORT_DIR EXPECTED.pt   ->   one JSON line on stdout
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import AutoModelForImageTextToText


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p.float(), -1), torch.log_softmax(q.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def main() -> None:
    export_dir, expected_path = sys.argv[1], sys.argv[2]
    expected = torch.load(expected_path)
    out = {"transformers": transformers.__version__}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model, info = AutoModelForImageTextToText.from_pretrained(export_dir, dtype=dtype, output_loading_info=True)
        with torch.no_grad():
            logits = model(input_ids=expected["ids"]).logits
        out[name] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                     "equal": torch.equal(logits.float(), expected["float32"]),
                     "max_abs_diff": float((logits.float() - expected["float32"]).abs().max()),
                     "kl_evaluated_vs_loaded": _kl(expected["float32"], logits)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
