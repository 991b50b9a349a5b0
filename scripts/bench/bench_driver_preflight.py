#!/usr/bin/env python3
"""The sweep driver's work before it connects to Ray (settings, grid, scheme resolution, input checks), timed in
fresh processes: first with an empty format-facts file (ModelOpt is imported to compute them), then with the file
written by the first (no ModelOpt import). Prints one RESULT json line.

    python scripts/bench/bench_driver_preflight.py --model-dir /tmp/tiny [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from auto_quantize_model.sweep.driver import _preflight
from auto_quantize_model.sweep.spec import load_sweep_spec
t1 = time.perf_counter()
spec = load_sweep_spec(None, {"name": "p", "model_dir": sys.argv[1], "captions_path": "demo",
    "storage_path": sys.argv[2], "schemes": sys.argv[3].split(","),
    "effective_bits": [15.0, 14.0, 12.0, 10.0, 8.0], "worker": {"num_gpus": 0}})
trials, _ = _preflight(spec, False)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"import_s": t1 - t0, "preflight_s": t2 - t1, "trials": len(trials),
                              "modelopt_imported": "modelopt" in sys.modules}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--schemes", default="fp8_autoquant_full,fp8_autoquant_all_layers_fp8,int4w_fp8_autoquant_mix")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="preflight-"))
    env = {**os.environ, "AUTOQUANT_FORMAT_CACHE": str(work / "facts.json")}
    rows = {}
    for label in ("empty_facts_file", "warm_facts_file"):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, args.model_dir, str(work / label), args.schemes],
                              capture_output=True, text=True, env=env, check=True)
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
        rows[label] = {**json.loads(line[7:]), "process_wall_s": time.perf_counter() - start}
    res = {"rows": rows, "machine": f"{platform.node()} {os.cpu_count()} CPUs", "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv)}
    print("RESULT " + json.dumps(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
