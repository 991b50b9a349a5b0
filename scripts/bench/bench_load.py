#!/usr/bin/env python3
"""What ``load_model`` costs, the previous path (``from_pretrained`` on the host, then moved) against the safetensors
loader (only the scope's tensors, straight to the device), each in a fresh process.

    python scripts/bench/bench_load.py --model-dir /tmp/qwen3b [--device cuda] [--repeats 3] [--cold]
        [--fresh-fingerprint] [--scope language_model] [--json-out OUT.json]

Per run, in a child process whose imports and CUDA start are done before the clock starts: ``load_model`` seconds,
GB/s (the scope's tensor bytes per second), peak host RSS and its rise over the load, peak GPU memory allocated; and,
timed apart, the model class's lazy import and the CUDA start, which a sweep worker's ``load`` phase also pays
(``worker_phase_s`` = the three). ``--cold`` evicts the checkpoint's files from the page cache before
each run (``posix_fadvise(DONTNEED)``, which needs no root; plus ``/proc/sys/vm/drop_caches`` where writable; both
recorded). ``--fresh-fingerprint`` starts every run with an empty fingerprint cache (the loader then hashes the files
alongside the read; the old path hashed them after it). Then one more child loads both ways and checks that every
parameter and buffer is bit-identical (``torch.equal``), ties are kept and the logits agree exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = {"old": True, "new": False}  # name -> via_from_pretrained


def _evict(model_dir: Path) -> dict[str, bool]:
    """Drop the checkpoint's pages from the page cache; what worked."""
    done = {"fadvise": True, "drop_caches": False}
    for f in model_dir.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                done["fadvise"] = False
            finally:
                os.close(fd)
    try:
        subprocess.run(["sync"], check=True, timeout=120)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        done["drop_caches"] = True
    except (OSError, subprocess.SubprocessError):
        pass
    return done


def _child(args: argparse.Namespace) -> dict:
    """One timed load in this process (imports and CUDA start first, off the clock)."""
    import torch
    import transformers

    from auto_quantize_model.models.loading import load_model, model_class, read_checkpoint_config
    from auto_quantize_model.models.scope import Scope

    _ = transformers.AutoTokenizer
    t = time.perf_counter()
    model_class(read_checkpoint_config(args.model_dir))  # the model class's lazy import
    class_import = time.perf_counter() - t
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    t = time.perf_counter()
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=args.device if args.device != "auto" else "cuda")
        torch.cuda.reset_peak_memory_stats()
    cuda_init = time.perf_counter() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    loaded = load_model(args.model_dir, Scope(args.scope), device=args.device, dtype=args.dtype,
                        via_from_pretrained=PATHS[args.child])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": args.child, "seconds": seconds, "bytes": loaded.load_bytes, "class_import_s": class_import,
            "cuda_init_s": cuda_init, "worker_phase_s": class_import + cuda_init + seconds,
            "load_steps": loaded.load_steps,
            "gb_per_s": loaded.load_bytes / 1e9 / seconds, "peak_rss_bytes": rss, "rss_rise_bytes": rss - rss0,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
            "fingerprint": loaded.weights_fingerprint, "device": str(loaded.device), "dtype": str(loaded.dtype),
            "loader": loaded.loader}


def _check(args: argparse.Namespace) -> dict:
    """Both paths in one process: every tensor and the logits bit-identical, ties kept."""
    import torch

    from auto_quantize_model.models.loading import load_model
    from auto_quantize_model.models.scope import Scope

    new = load_model(args.model_dir, Scope(args.scope), device=args.device, dtype=args.dtype)
    old = load_model(args.model_dir, Scope(args.scope), device=args.device, dtype=args.dtype, via_from_pretrained=True)

    def tensors(m):
        named = dict(m.named_parameters(remove_duplicate=False))
        named.update(m.named_buffers(remove_duplicate=False))
        return named

    a, b = tensors(new.model), tensors(old.model)
    differ = sorted(k for k in a.keys() & b.keys() if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]))
    tied = [n for n, _ in new.model.named_parameters(remove_duplicate=False)]
    ids = new.tokenizer(["A red dog sitting on a wooden bench."], return_tensors="pt").input_ids.to(new.device)
    with torch.no_grad():
        if Scope(args.scope) is Scope.LANGUAGE_MODEL:
            same_logits = torch.equal(new.model(ids), old.model(ids))
            ties = new.model.lm_head.weight is new.model.model.embed_tokens.weight
        else:
            same_logits = torch.equal(new.model(input_ids=ids).logits, old.model(input_ids=ids).logits)
            ties = True
    return {"tensors": len(a), "names_equal": a.keys() == b.keys(), "differ": differ[:5], "n_differ": len(differ),
            "same_logits": same_logits, "lm_head_tied": ties, "parameters_listed": len(tied),
            "identical": a.keys() == b.keys() and not differ and same_logits}


def _reader(args: argparse.Namespace) -> dict:
    """The GPU path's host side alone: ``read_into`` of the language model's tensors into host tensors (preadv into
    staging buffers, then copies; on a GPU the copies are DMA uploads instead), page cache as it is."""
    import torch

    from auto_quantize_model.models.safetensors_read import DTYPES, read_into
    from auto_quantize_model.safetensors_header import check_header

    plan, total = [], 0
    for f in sorted(Path(args.model_dir).glob("*.safetensors")):
        header = check_header(f)
        dests = [(e, torch.empty(e.shape, dtype=DTYPES[e.dtype])) for e in header.entries.values()
                 if not e.name.startswith("visual.")]
        for _, d in dests:
            d.view(-1).view(torch.uint8)[::4096].zero_()  # fault the pages in: a GPU destination has none to fault
        total += sum(e.end - e.start for e, _ in dests)
        plan.append((f, dests))
    stats = read_into(plan, torch.device("cpu"), [])
    return {"bytes": total, "seconds": stats.seconds, "gb_per_s": stats.gb_per_s}


def _spawn(args: argparse.Namespace, mode: str, cache: Path) -> dict:
    env = {**os.environ, "AUTOQUANT_FINGERPRINT_CACHE": str(cache)}
    cmd = [sys.executable, __file__, "--model-dir", args.model_dir, "--device", args.device, "--dtype", args.dtype,
           "--scope", args.scope, *(["--child", args.path] if mode == "child" else [f"--{mode}"])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--scope", default="language_model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each run")
    p.add_argument("--fresh-fingerprint", action="store_true", help="an empty fingerprint cache for every run")
    p.add_argument("--no-check", action="store_true", help="skip the bit-identity check")
    p.add_argument("--reader", action="store_true",
                   help="also time the GPU path's host side alone (read into host tensors), for CPU-only machines")
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", choices=sorted(PATHS), help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--read-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default="new", help=argparse.SUPPRESS)  # the parent's: which path the next child runs
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    if args.check:
        print("RESULT " + json.dumps(_check(args)), flush=True)
        return
    if args.read_only:
        print("RESULT " + json.dumps(_reader(args)), flush=True)
        return
    import torch
    import transformers

    model_dir = Path(args.model_dir)
    files = sorted(f for f in model_dir.iterdir() if f.name.endswith(".safetensors"))
    res: dict = {"model_dir": str(model_dir.resolve()), "checkpoint_bytes": sum(f.stat().st_size for f in files),
                 "device": args.device, "dtype": args.dtype, "scope": args.scope, "cold": args.cold,
                 "fresh_fingerprint": args.fresh_fingerprint, "machine": platform.node(), "cpus": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                 "date": time.strftime("%Y-%m-%d"), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache = Path(tmp) / "warm.json"
        if not args.fresh_fingerprint:  # one untimed load fills the fingerprint cache (and the page cache)
            args.path = "new"
            _spawn(args, "child", warm_cache)
        for i in range(args.repeats):
            for name in ("old", "new"):  # alternated, so drift on a shared machine hits both
                args.path = name
                evicted = _evict(model_dir) if args.cold else None
                cache = Path(tmp) / f"fresh{i}{name}.json" if args.fresh_fingerprint else warm_cache
                run = _spawn(args, "child", cache)
                run.update(repeat=i, evicted=evicted)
                res["runs"].append(run)
                print(f"{name} ({run['loader']}): {run['seconds']:.2f}s {run['gb_per_s']:.2f} GB/s (as the worker's "
                      f"load phase, with the class import and CUDA start: {run['worker_phase_s']:.2f}s), peak RSS "
                      f"{run['peak_rss_bytes'] / 2**30:.2f} GiB (+{run['rss_rise_bytes'] / 2**30:.2f}), peak GPU "
                      f"{run['peak_gpu_bytes'] / 2**30:.2f} GiB", flush=True)
        if not args.no_check:
            res["check"] = _spawn(args, "check", warm_cache)
        if args.reader:
            res["reader"] = [_spawn(args, "read-only", warm_cache) for _ in range(args.repeats)]
            print(f"reader (host side of the GPU path): {[round(r['gb_per_s'], 2) for r in res['reader']]} GB/s")
    for name in ("old", "new"):
        runs = [r for r in res["runs"] if r["path"] == name]
        res[f"{name}_median_s"] = statistics.median(r["seconds"] for r in runs)
        res[f"{name}_median_gb_per_s"] = statistics.median(r["gb_per_s"] for r in runs)
        res[f"{name}_median_worker_phase_s"] = statistics.median(r["worker_phase_s"] for r in runs)
    res["speedup"] = res["old_median_s"] / res["new_median_s"]
    print(f"median: old {res['old_median_s']:.2f}s, new {res['new_median_s']:.2f}s ({res['speedup']:.1f}x); "
          f"check: {res.get('check')}")
    line = json.dumps(res)
    print("RESULT " + line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
