#!/usr/bin/env python3
"""The sweep against what a user would otherwise run, on the same grid and machine.

Modes (each prints one ``RESULT {json}`` line; ``compare`` runs several as fresh processes, one after another, and
times each end to end from process start, imports included):

    loop      one `autoquant run` process per trial (``--shared-cache``: one --cache-dir for all of them, so a
              trial with a key seen before re-solves from ModelOpt's checkpoint). ``--limit-per-key N`` times only
              the first N trials of each scoring group, ``--resolves K`` the first trial of each group and K
              re-solves in all; the rest are projected from the mean re-solve time.
    api-loop  one Python process over the project's API: load_language_model + build_calibration_set once,
              run_scheme per trial with one cache_dir (what the issue calls the one-process loop).
    session   one Python process over SearchSession: prepare() runs the shared scoring passes, run() per trial
              (re-solves in memory where the key repeats). The strongest single-process baseline.
    sweep     `run_sweep`: local Ray (or --address), one worker per GPU. Reports the sweep's start phase by phase
              (``phases``: seconds from the run_sweep call; ``before_run_sweep_s``: process start to that call).
    kept      a `ray start --head` of its own (free ports, own temp dir; ray_head.py), then ``sweep --keep-workers
              --cache-dir`` on it twice as fresh processes (first, repeat), then `autoquant release-workers`; the
              head is stopped through its process group (never `ray stop`).
    compare   runs ``--modes`` (default session,api-loop,sweep) as subprocesses on the same grid.
    report    reads the JSON files ``run_kept_workers.sh`` wrote (``--work`` = their folder) and prints the table.

The grid is the sweep's own (``expand_grid``: schemes x bits x score steps, equivalent experiments merged), so
every mode runs exactly the same trials.

    python scripts/bench/bench_sweep.py compare --model-dir DIR --captions-path C [--schemes A,B --bits 14,12]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()  # as early as this script can take it (imports below count)

DEFAULT_SCHEMES = "fp8_autoquant_full,fp8_autoquant_all_layers_fp8,int4w_fp8_autoquant_mix,int8_fp8"
FORMAT_SETS = str(Path(__file__).with_name("format_sets.toml"))


def _spec(args: argparse.Namespace, name: str):
    from auto_quantize_model.sweep.spec import load_sweep_spec

    steps = tuple(int(s) for s in args.score_steps.split(",")) if args.score_steps else (args.steps,)
    return load_sweep_spec(None, {
        "name": name, "model_dir": args.model_dir, "storage_path": str(Path(args.work) / "sweeps"),
        "captions_path": args.captions_path, "schemes": tuple(args.schemes.split(",")),
        "schemes_file": args.schemes_file, "effective_bits": tuple(float(b) for b in args.bits.split(",")),
        "num_score_steps": steps, "num_calib_steps": args.steps, "max_calib_samples": args.samples,
        "batch_size": 4, "calib_seq_len": 256, "num_workers": args.num_workers, "address": args.address,
        "cache_dir": args.cache_dir, **({"scheduler": args.scheduler} if args.scheduler else {}),
        "worker": {"num_gpus": args.worker_gpus, "num_cpus": 2, "pristine": args.pristine,
                   "num_threads": args.worker_threads, "keep": args.keep_workers},
    })


def _grid(args: argparse.Namespace):
    """(trial dict, resolved scheme) for every trial of the sweep's grid."""
    from auto_quantize_model.sweep.spec import expand_grid

    return [(t.to_dict(), t.resolved) for t in expand_grid(_spec(args, "grid"))]


def _load(args: argparse.Namespace):
    import torch

    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.models.loading import load_language_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_language_model(args.model_dir, device=device)
    calib = build_calibration_set(loaded.tokenizer, read_captions(args.captions_path), max_samples=args.samples,
                                  batch_size=4, seq_len=256, seed=0, device=loaded.device)
    return loaded, calib


def loop(args: argparse.Namespace) -> dict:
    grid = _grid(args)
    cache = Path(args.work) / "loop-cache"
    groups: dict[tuple, list] = {}
    for t, s in grid:  # a scoring group: same scheme setup except the budget (the data are the same for all)
        groups.setdefault((tuple(sorted(s.quantization_formats)), s.method, t["num_score_steps"], s.disabled_layers),
                          []).append(t)
    if args.resolves:  # the first of each group, then re-solves taken from the groups in turn
        later = [t for rank in range(1, max(map(len, groups.values()))) for g in groups.values() if rank < len(g)
                 for t in [g[rank]]]
        timed = [g[0] for g in groups.values()] + later[: args.resolves]
    else:
        timed = [t for g in groups.values() for t in g[: args.limit_per_key or len(g)]]
    first = {g[0]["trial_id"] for g in groups.values()}
    per: dict[str, float] = {}
    for t in timed:
        out = Path(args.work) / "loop" / t["trial_id"]
        cmd = [sys.executable, "-m", "auto_quantize_model.cli", "run", "--scheme-name", t["scheme"], "--model-dir",
               args.model_dir, "--output-dir", str(out), "--captions-path", args.captions_path, "--effective-bits",
               str(t["effective_bits_target"]), "--max-calib-samples", str(args.samples), "--batch-size", "4",
               "--calib-seq-len", "256", "--num-calib-steps", str(t["num_calib_steps"]),
               "--auto-quantize-method", t["method"]]
        if t["num_score_steps"]:
            cmd += ["--num-score-steps", str(t["num_score_steps"])]
        if args.schemes_file:
            cmd += ["--schemes-file", args.schemes_file]
        if args.shared_cache:
            cmd += ["--cache-dir", str(cache)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        per[t["trial_id"]] = time.perf_counter() - start
        print(f"loop {t['trial_id']}: {per[t['trial_id']]:.1f}s", flush=True)
    computed = [v for k, v in per.items() if k in first]
    resolved = [v for k, v in per.items() if k not in first]
    # Without a shared cache every trial computes; with one, a group's later trials re-solve.
    later = statistics.mean(resolved) if resolved and args.shared_cache else statistics.mean(per.values())
    projected = sum(computed) + later * (len(grid) - len(computed))
    return {"mode": "loop", "shared_cache": args.shared_cache, "grid_trials": len(grid), "timed_trials": len(per),
            "first_of_key_s": computed, "later_s": resolved, "timed_wall_s": sum(per.values()),
            "projected_wall_s": projected, "per_trial_s": per}


def api_loop(args: argparse.Namespace) -> dict:
    from auto_quantize_model.autoquant.run import run_scheme

    grid = _grid(args)
    t = time.perf_counter()
    loaded, calib = _load(args)
    load_s = time.perf_counter() - t
    scored = 0
    for trial, scheme in grid:
        r = run_scheme(loaded, calib, scheme, Path(args.work) / "api-loop" / trial["trial_id"],
                       cache_dir=Path(args.work) / "api-loop-cache")
        scored += r.scored
    return {"mode": "api-loop", "trials": len(grid), "scoring_passes": scored, "load_s": load_s,
            "load_steps": loaded.load_steps, "wall_s": time.perf_counter() - T_PROCESS}


def session(args: argparse.Namespace) -> dict:
    from auto_quantize_model.autoquant.session import SearchSession

    grid = _grid(args)
    t = time.perf_counter()
    loaded, calib = _load(args)
    load_s = time.perf_counter() - t
    s = SearchSession(loaded, calib, Path(args.work) / "session-cache")
    t = time.perf_counter()
    passes = s.prepare([scheme for _, scheme in grid])
    prepare_s = time.perf_counter() - t
    scored = sum(p.ran for p in passes)
    for trial, scheme in grid:
        scored += s.run(scheme, Path(args.work) / "session" / trial["trial_id"]).scored
    return {"mode": "session", "trials": len(grid), "scoring_passes": scored, "shared_passes": len(passes),
            "load_s": load_s, "load_steps": loaded.load_steps, "prepare_s": prepare_s, "wall_s": time.perf_counter() - T_PROCESS}


def _trace_old_driver(marks: dict[str, float]) -> None:
    """On a driver that records no phases of its own (before this script learned to read them), stamp the end of
    the same steps by wrapping its functions (names as they were then); the pool's timestamps do the rest."""
    import auto_quantize_model.sweep.driver as driver

    if hasattr(driver, "PHASES"):
        return

    def stamp(name: str, mark: str) -> None:
        fn = getattr(driver, name, None)
        if fn is None:
            return

        def wrapped(*a, **k):
            out = fn(*a, **k)
            marks.setdefault(mark, time.time())
            return out

        setattr(driver, name, wrapped)

    for name, mark in (("_preflight", "preflight"), ("_connect", "connected"), ("fit_to_cluster", "fitted"),
                       ("launch_workers", "launched"), ("group_units", "units")):
        stamp(name, mark)
    callback = getattr(driver, "ProgressLine", None)
    if callback is not None:
        seen = callback.on_trial_result

        def first(self, *a, **k):
            marks.setdefault("first_result", time.time())
            return seen(self, *a, **k)

        callback.on_trial_result = first


def sweep(args: argparse.Namespace) -> dict:
    from auto_quantize_model.sweep.driver import run_sweep

    spec = _spec(args, args.name)
    marks: dict[str, float] = {}
    _trace_old_driver(marks)
    if args.fake_gpus:  # CPU smoke runs: a local Ray offering fake GPUs (the sweep then starts none of its own)
        import ray

        ray.init(num_gpus=args.fake_gpus, namespace="autoquant", include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    t_wall = time.time()
    before = t - T_PROCESS
    res = run_sweep(spec)
    wall = time.perf_counter() - t
    ok = [r for r in res["rows"] if r.get("status") == "ok"]
    split = {k: sum(r.get(k) or 0.0 for r in ok) for k in
             ("time_restore", "time_scoring_pass", "time_calibrate", "time_score", "time_solve", "time_write",
              "time_trial")}
    loads = sorted({(r["worker"], r["worker_load_seconds"]) for r in ok})
    restores = [r.get("time_restore") or 0.0 for r in ok if r.get("time_restore")]
    stats = res["stats"]
    phases = res.get("phases")
    if phases is None:  # a driver that records none: the traced steps plus the pool's stamps
        marks.update({"first_unit_request": stats.get("first_unit_request_at"),
                      "workers_ready": max(stats.get("registered_at", {}).values(), default=None)})
        phases = {k: round(v - t_wall, 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1] or 0) if v}
    peaks: dict[str, float] = {}
    for r in ok:
        peaks[r["worker"]] = max(peaks.get(r["worker"], 0.0), (r.get("gpu_peak_bytes") or 0) / 2**30)
    return {"mode": "sweep", "trials": len(res["rows"]), "ok": len(ok), "num_workers": res["num_workers"],
            "scheduler": res.get("scheduler", "tune"), "before_run_sweep_s": before, "phases": phases,
            "run_sweep_s": wall, "after_ray_start_s": res["wall_seconds"], "wall_s": time.perf_counter() - T_PROCESS,
            "scoring_passes": stats["passes"], "reuses": stats["reuses"],
            "worker_load_s": [x[1] for x in loads], "sum_over_trials_s": split,
            "gpu_peak_gib": max(peaks.values(), default=0.0) if ok else None, "gpu_peak_gib_per_worker": peaks,
            # Seconds to make (and check) each new search's working copy from the pristine one.
            "fresh_copy_s": restores, "pristine_on": args.pristine,
            "worker_load_phases": sorted({json.dumps(r.get("worker_load_phases")) for r in ok}),
            "worker_load_steps": sorted({json.dumps(r.get("worker_load_steps")) for r in ok}),
            # From the run_sweep call: when the first unit asked for work and when each worker was ready.
            "first_tune_request_s": (stats["first_unit_request_at"] or t_wall) - t_wall,
            "workers_ready_s": sorted(v - t_wall for v in stats["registered_at"].values())}


def kept(args: argparse.Namespace, argv: list[str]) -> dict:
    """A head of its own, the sweep on it twice with kept workers and one cache, then release-workers."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ray_head import RayHead

    work = Path(args.work)
    rows: dict[str, dict] = {}
    gpus = args.head_gpus if args.head_gpus >= 0 else _gpu_count()
    # A short temp dir: Ray's Unix socket paths under it must stay under 108 bytes. No token auth: a loopback head.
    head = RayHead(tempfile.mkdtemp(prefix="aqhead-", dir="/tmp"), num_cpus=args.head_cpus or os.cpu_count() or 2,
                   num_gpus=gpus)
    t = time.perf_counter()
    with head:
        rows["ray_start_s"] = time.perf_counter() - t
        passed = _passed(argv, drop=("--work", "--name", "--json-out"))
        for name in ("kept-first", "kept-second"):
            sub = [sys.executable, __file__, "sweep", *passed, "--address", head.address, "--keep-workers",
                   "--cache-dir", str(work / "cache"), "--name", name, "--work", str(work / name)]
            start = time.perf_counter()
            done = subprocess.run(sub, capture_output=True, text=True, env=head.env)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode or line is None:
                rows[name] = {"error": (done.stderr or done.stdout)[-3000:]}
                print(f"{name}: FAILED\n{rows[name]['error']}", flush=True)
                break
            rows[name] = {**json.loads(line[len("RESULT "):]), "process_wall_s": time.perf_counter() - start}
            print(f"{name}: {rows[name]['process_wall_s']:.1f}s end to end, phases {rows[name]['phases']}", flush=True)
        release = subprocess.run([sys.executable, "-m", "auto_quantize_model.cli", "release-workers", "--address",
                                  head.address], capture_output=True, text=True, env=head.env)
        rows["release"] = (release.stdout or release.stderr).strip()[-500:]
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return {"mode": "kept", **rows}


def _gpu_count() -> int:
    return _device()[1]


def _device() -> tuple[str, int]:
    """The GPU model and count (nvidia-smi: importing torch only to name the device adds seconds to the driver's
    process), or ("cpu", 0)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "cpu", 0
    names = [n.strip() for n in names if n.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = len([v for v in visible.split(",") if v.strip()]) if visible is not None else len(names)
    return (names[0], min(count, len(names))) if names else ("cpu", 0)


def _passed(argv: list[str], drop: tuple[str, ...]) -> list[str]:
    """``argv`` after the mode, without the options in ``drop`` (each with its value)."""
    out, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        out.append(a)
    return out


def compare(args: argparse.Namespace, argv: list[str]) -> dict:
    rows = {}
    passed = _passed(argv, drop=("--json-out",))  # the children get every setting but the comparison's own file
    for mode in args.modes.split(","):
        sub = [sys.executable, __file__, mode, *passed, "--work", str(Path(args.work) / mode), "--name", mode]
        start = time.perf_counter()
        done = subprocess.run(sub, capture_output=True, text=True)
        wall = time.perf_counter() - start
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode or line is None:
            rows[mode] = {"error": (done.stderr or done.stdout)[-2000:], "process_wall_s": wall}
            print(f"{mode}: FAILED\n{rows[mode]['error']}", flush=True)
            continue
        rows[mode] = {**json.loads(line[len("RESULT "):]), "process_wall_s": wall}
        print(f"{mode}: {wall:.1f}s end to end", flush=True)
    return {"mode": "compare", "rows": rows}


def report(args: argparse.Namespace) -> dict:
    """The table of one ``run_kept_workers.sh`` call: every way to run the grid, ratios, the repeat's start."""
    folder = Path(args.work)

    def read(name: str) -> dict:
        path = folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    session, api, local, direct, kept_runs, loop_res = (
        read(n) for n in ("session", "api-loop", "sweep-local", "sweep-direct", "kept", "loop-shared"))
    first, second = kept_runs.get("kept-first", {}), kept_runs.get("kept-second", {})
    walls = {"session": session.get("wall_s"), "api-loop": api.get("wall_s"), "sweep-local": local.get("wall_s"),
             "sweep-direct": direct.get("wall_s"),
             "kept-first": first.get("wall_s"), "kept-second": second.get("wall_s"),
             # ... and as its parent saw it: interpreter start and the driver's exit (Ray disconnect) included
             "kept-second (whole process)": second.get("process_wall_s"),
             "loop-shared (projected)": loop_res.get("projected_wall_s")}
    ratios = {}
    for a, b in (("sweep-local", "session"), ("sweep-direct", "session"), ("sweep-local", "api-loop"),
                 ("kept-first", "session"),
                 ("loop-shared (projected)", "kept-second")):
        if walls.get(a) and walls.get(b):
            ratios[f"{a} / {b}"] = walls[a] / walls[b]
    out = {"mode": "report", "wall_s": walls, "ratios": ratios,
           "repeat_before_run_sweep_s": second.get("before_run_sweep_s"), "repeat_phases": second.get("phases"),
           "repeat_scheduler": second.get("scheduler"), "repeat_trials_s": second.get("sum_over_trials_s"),
           "first_sweep_phases": local.get("phases"),
           "gpu_peak_gib_per_worker": {k: v.get("gpu_peak_gib_per_worker") for k, v in
                                       (("sweep-local", local), ("sweep-direct", direct), ("kept-first", first),
                                        ("kept-second", second))},
           "ray_start_s": kept_runs.get("ray_start_s")}
    for k, v in walls.items():
        print(f"{k:>24}: {'-' if v is None else f'{v:.1f} s'}", flush=True)
    for k, v in ratios.items():
        print(f"{k:>40}: {v:.2f}x", flush=True)
    print(f"repeat sweep: process start to run_sweep {out['repeat_before_run_sweep_s']}, then {out['repeat_phases']}",
          flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("loop", "api-loop", "session", "sweep", "kept", "compare", "report"))
    p.add_argument("--model-dir", required=False)
    p.add_argument("--captions-path", required=False)
    p.add_argument("--schemes", default=DEFAULT_SCHEMES)
    p.add_argument("--schemes-file", default=FORMAT_SETS, help="extra schemes (default: format_sets.toml here)")
    p.add_argument("--bits", default="15,14,12,10,8")
    p.add_argument("--score-steps", default=None, help="comma list, one scoring key each")
    p.add_argument("--steps", type=int, default=16, help="calibration (and default scoring) steps")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--address", default=None, help="sweep: a running Ray cluster")
    p.add_argument("--pristine", default="auto")
    p.add_argument("--worker-gpus", type=float, default=1.0, help="GPU share per worker (0 = CPU workers)")
    p.add_argument("--worker-threads", type=int, default=0, help="sweep: worker host threads (0 = CPUs / workers)")
    p.add_argument("--keep-workers", action="store_true", help="sweep: keep the workers on the cluster (--address)")
    p.add_argument("--cache-dir", default=None, help="sweep: search checkpoints shared across sweeps")
    p.add_argument("--shared-cache", action="store_true", help="loop: one --cache-dir for every trial")
    p.add_argument("--limit-per-key", type=int, default=0, help="loop: time only the first N trials per key")
    p.add_argument("--resolves", type=int, default=0,
                   help="loop: time the first trial of each key and K re-solves in all (overrides --limit-per-key)")
    p.add_argument("--scheduler", default=None, help="sweep: tune, direct or auto (default: the sweep's own)")
    p.add_argument("--head-gpus", type=int, default=-1, help="kept: GPUs the head offers (default: those torch sees; "
                                                              "on a CPU machine give 1 for a fake GPU)")
    p.add_argument("--head-cpus", type=int, default=0, help="kept: CPUs the head offers (default: all)")
    p.add_argument("--fake-gpus", type=int, default=0, help="sweep: on a CPU machine, a local Ray with N fake GPUs")
    p.add_argument("--modes", default="session,api-loop,sweep", help="compare: which modes, in order")
    p.add_argument("--name", default="bench")
    p.add_argument("--work", default="/tmp/bench_sweep")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.mode != "report" and not (args.model_dir and args.captions_path):
        p.error("--model-dir and --captions-path are required")
    modes = {"loop": loop, "api-loop": api_loop, "session": session, "sweep": sweep, "report": report}
    if args.mode in ("compare", "kept"):
        res = (compare if args.mode == "compare" else kept)(args, sys.argv[1:])
    else:
        res = modes[args.mode](args)
    res["device"], res["gpus"] = _device()
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res["command"] = " ".join(sys.argv)
    line = json.dumps(res)
    print("RESULT " + line, flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()
