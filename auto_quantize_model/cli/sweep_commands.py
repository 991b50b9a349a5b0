"""Subcommands over many runs: sweep (Ray Tune) and analyze (Parquet tables, plots)."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys

from auto_quantize_model.cli.common import check_output_dir
from auto_quantize_model.preflight import probe_writable
from auto_quantize_model.settings import add_arguments, describe_toml, overrides_from_args

log = logging.getLogger("autoquant")


def resume_command(argv: list[str]) -> str:
    """The command line that continues this sweep: the same arguments plus ``--resume``."""
    return shlex.join(["autoquant", *argv, *([] if "--resume" in argv else ["--resume"])])


def cmd_sweep(args: argparse.Namespace) -> int:
    """Schemes x effective-bits grid on Ray Tune, one model worker per GPU."""
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import SweepSpec, load_sweep_spec

    spec = load_sweep_spec(args.config, overrides_from_args(args, SweepSpec))
    res = run_sweep(spec, resume=args.resume)
    print(res["summary"])
    print(f"results: {res['sweep_dir']} (tables: {res['tables']})")
    if res.get("interrupted"):
        print(f"sweep interrupted by {res['interrupted']}; continue it with:\n  {resume_command(sys.argv[1:])}",
              file=sys.stderr)
        return 128 + int(getattr(signal, res["interrupted"]))
    failed = [r for r in res["rows"] if r.get("status") != "ok"]
    return 1 if failed and len(failed) == len(res["rows"]) else 0


def cmd_release_workers(args: argparse.Namespace) -> int:
    """Stop the model workers that sweeps with --keep-workers left on a running cluster."""
    from auto_quantize_model.sweep.workers import release_kept_workers

    names, busy = release_kept_workers(args.address, force=args.force)
    print(f"released {len(names)} kept worker(s)" + (f": {', '.join(names)}" if names else ""))
    if busy:
        print(f"left {len(busy)} serving a running sweep (--force stops them too): {', '.join(busy)}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Tables, plots and analysis.md from sweep directories or manifests."""
    from auto_quantize_model.analysis.report import analyze

    out = probe_writable(check_output_dir(args.output_dir), "output dir", "--output-dir")
    res = analyze(args.sources, out, workers=args.workers)
    for src, reason in res["skipped"]:
        print(f"skipped {src}: {reason}", file=sys.stderr)
    print(f"{res['num_trials']} trials -> {out / 'tables'}; report {res['report']}; "
          f"{len(res['plots'])} plots ({res['total_seconds']:.1f} s)")
    return 0


def register(sub) -> None:
    """Add this module's subcommands."""
    from auto_quantize_model.sweep.spec import SweepSpec

    p = sub.add_parser("sweep", help="schemes x effective bits on Ray Tune, a model worker per GPU",
                       epilog=describe_toml(SweepSpec))
    p.add_argument("--config", help="sweep TOML (flags override its values)")
    add_arguments(p, SweepSpec)  # every setting's flag, help and kind, from SweepSpec's fields
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("release-workers", help="stop the model workers kept by sweeps with --keep-workers")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS)")
    p.add_argument("--force", action="store_true", help="also stop kept workers that a running sweep is using")
    p.set_defaults(func=cmd_release_workers)
    p = sub.add_parser("analyze", help="Parquet tables, plots and analysis.md from manifests")
    p.add_argument("sources", nargs="+", help="sweep/run directories, manifest files or globs")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--workers", type=int, default=2, help="processes for reading manifests (default 2)")
    p.set_defaults(func=cmd_analyze)
