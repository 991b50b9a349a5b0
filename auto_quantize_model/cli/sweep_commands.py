"""Subcommands over many runs: sweep (Ray Tune) and analyze (Parquet tables, plots)."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys

from auto_quantize_model.cli.common import check_output_dir
from auto_quantize_model.errors import UserError
from auto_quantize_model.preflight import probe_writable

log = logging.getLogger("autoquant")


def _numbers(text: str | None, kind: type = float) -> tuple | None:
    """Comma-separated numbers of ``kind``; with ``int``, ``2.5`` is refused, not truncated."""
    if not text:
        return None
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        what = "whole numbers" if kind is int else "numbers"
        raise UserError(f"expected comma-separated {what}, got {text!r}") from exc


def _floats(text: str | None) -> tuple[float, ...] | None:
    return _numbers(text, float)


def _ints(text: str | None) -> tuple[int, ...] | None:
    return _numbers(text, int)


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def resume_command(argv: list[str]) -> str:
    """The command line that continues this sweep: the same arguments plus ``--resume``."""
    return shlex.join(["autoquant", *argv, *([] if "--resume" in argv else ["--resume"])])


def cmd_sweep(args: argparse.Namespace) -> int:
    """Schemes x effective-bits grid on Ray Tune, one model worker per GPU."""
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import load_sweep_spec

    overrides = {
        "name": args.name, "model_dir": args.model_dir, "storage_path": args.storage_path,
        "captions_path": args.captions_path, "schemes": _names(args.schemes), "effective_bits": _floats(args.effective_bits),
        "methods": _names(args.methods), "num_score_steps": _ints(args.num_score_steps),
        "num_workers": args.num_workers, "address": args.address, "max_calib_samples": args.max_calib_samples,
        "batch_size": args.batch_size, "calib_seq_len": args.calib_seq_len, "seed": args.seed,
        "evaluate": True if args.evaluate else None, "eval_captions": args.eval_captions,
        "schemes_file": args.schemes_file, "max_failures": args.max_failures,
        "chat_template": True if args.chat_template else None,
        "measure": True if args.measure else None, "measure_batch_size": args.measure_batch_size,
        "measure_seq_len": args.measure_seq_len, "cache_dir": args.cache_dir,
    }
    spec = load_sweep_spec(args.config, overrides)
    if args.keep_workers:
        import dataclasses

        spec = dataclasses.replace(spec, worker=dataclasses.replace(spec.worker, keep=True))
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
    from auto_quantize_model.sweep.driver import release_kept_workers

    names = release_kept_workers(args.address)
    print(f"released {len(names)} kept worker(s)" + (f": {', '.join(names)}" if names else ""))
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
    p = sub.add_parser("sweep", help="schemes x effective bits on Ray Tune, a model worker per GPU")
    p.add_argument("--config", help="sweep TOML (flags override its values)")
    p.add_argument("--name", help="sweep name (directory under --storage-path)")
    p.add_argument("--model-dir")
    p.add_argument("--storage-path", help="results root; shared storage on multi-node clusters")
    p.add_argument("--captions-path")
    p.add_argument("--schemes", help="comma-separated scheme names")
    p.add_argument("--effective-bits", help="comma-separated targets, e.g. 14,12,10,8")
    p.add_argument("--methods", help="comma-separated: gradient,kl_div")
    p.add_argument("--num-score-steps", help="comma-separated scoring step counts")
    p.add_argument("--num-workers", type=int, help="model workers (default: one per GPU)")
    p.add_argument("--max-calib-samples", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--calib-seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat-template", action="store_true", help="wrap captions in the checkpoint's chat template")
    p.add_argument("--evaluate", action="store_true",
                   help="perplexity/KL vs the unquantized model for every trial, and the uniform FP8 control")
    p.add_argument("--eval-captions", help="held-out captions for --evaluate (default: the calibration source)")
    p.add_argument("--measure", action="store_true",
                   help="GPU only: each trial's real FP8 prefill/decode tokens/s and LM weight memory vs BF16 "
                        "and uniform FP8 (measurement.json, trials table)")
    p.add_argument("--measure-batch-size", type=int, help="prefill batch for --measure (default 4)")
    p.add_argument("--measure-seq-len", type=int, help="prefill tokens per sequence for --measure (default 512)")
    p.add_argument("--schemes-file")
    p.add_argument("--max-failures", type=int, help="retries of a trial whose worker died (default 2)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--cache-dir", help="search checkpoints shared across sweeps (default: <sweep>/autoquant/cache)")
    p.add_argument("--keep-workers", action="store_true",
                   help="leave the loaded model workers on the running cluster (--address) for the next sweep")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("release-workers", help="stop the model workers kept by sweeps with --keep-workers")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS)")
    p.set_defaults(func=cmd_release_workers)
    p = sub.add_parser("analyze", help="Parquet tables, plots and analysis.md from manifests")
    p.add_argument("sources", nargs="+", help="sweep/run directories, manifest files or globs")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--workers", type=int, default=2, help="processes for reading manifests (default 2)")
    p.set_defaults(func=cmd_analyze)
