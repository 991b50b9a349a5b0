#!/usr/bin/env python3
"""What the weights fingerprint costs: hashing every weight file once, then the stat-keyed cache hit.

    python scripts/bench/bench_fingerprint.py --model-dir /tmp/qwen3b [--json-out OUT.json]

Times three cases with a fresh fingerprint cache file: (1) after trying to drop the OS page cache (recorded
whether that worked: without root it does not, and the files are then read from memory), (2) again with a
fresh cache file (page cache warm), (3) with the cache file from (2) (the normal case for a second run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path


def _drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True, timeout=120)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    from auto_quantize_model.models.fingerprint import weight_files, weights_fingerprint

    files = weight_files(args.model_dir)
    size = sum(f.stat().st_size for f in files)
    res = {"files": len(files), "bytes": size, "cpus": os.cpu_count(), "machine": platform.node()}
    with tempfile.TemporaryDirectory() as tmp:
        for case, fresh in (("cold_after_drop", True), ("page_cache_warm", True), ("cached", False)):
            cache = Path(tmp) / (f"{case}.json" if fresh else "page_cache_warm.json")
            os.environ["AUTOQUANT_FINGERPRINT_CACHE"] = str(cache)
            if case == "cold_after_drop":
                res["page_cache_dropped"] = _drop_page_cache()
            t = time.perf_counter()
            fp = weights_fingerprint(args.model_dir)
            res[f"{case}_s"] = time.perf_counter() - t
            res["fingerprint"] = fp
    res["cold_gb_per_s"] = size / 1e9 / res["cold_after_drop_s"]
    line = json.dumps(res)
    print("RESULT " + line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()
