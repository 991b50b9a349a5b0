"""``autoquant export`` (a run as a deployable Hugging Face checkpoint, ModelOpt unified format or compressed-tensors,
equal to the evaluated model) and ``autoquant ship`` (pick a trial of a sweep by a rule, export it, print how to serve
it)."""

from __future__ import annotations

import argparse
import shlex

from auto_quantize_model.export.settings import ExportOptions
from auto_quantize_model.settings import add_arguments, overrides_from_args


def cmd_export(args: argparse.Namespace) -> int:
    """Export the whole VLM with the run's FP8/BF16 layer choice; print where it went."""
    from auto_quantize_model.export.hf import export_run

    result = export_run(args.run_dir, args.model_dir, args.output_dir, device=args.device, format=args.format,
                        kv_cache=args.kv_cache)
    info = result.info
    w = info["weights"]
    kv = "FP8 KV cache (not scored by the search)" if info["kv_cache"].get("dtype") == "fp8_e4m3" else "BF16 KV cache"
    print(f"export: {result.output_dir} ({info['format']} format, {info['layers']['fp8']}/{info['layers']['total']} "
          f"layers FP8, {info['serving']['fused_scales']} fused scales, {kv}, language model "
          f"{w['language_model_bytes'] / 1e9:.3f} GB, lm_head {info['lm_head']})")
    print(f"which loaders read it: {result.output_dir / info['loaders']['file']}")
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    """Pick a trial by the rule, export it, print why it won and how to serve it (refusals: one line, exit 2)."""
    from auto_quantize_model.analysis.pick import ShipRule
    from auto_quantize_model.analysis.ship import ship, ship_command

    rule = ShipRule(**overrides_from_args(args, ShipRule))
    done = ship(args.sources, rule, args.output_dir, model_dir=args.model_dir, device=args.device,
                export_format=args.format, kv_cache=args.kv_cache, dry_run=args.dry_run)
    print(f"ship: {done.pick.line()}")
    if done.output_dir is None:
        trial = str(done.pick.winner["trial_id"])
        target = args.output_dir or f"exports/{trial}"
        print(f"dry run, nothing written; to export it: {ship_command(args.sources, rule, target)}")
        return 0
    layers = done.export_info.get("layers") or {}
    detail = f" ({layers['fp8']}/{layers['total']} LM layers FP8)" if {"fp8", "total"} <= set(layers) else ""
    print(f"export: {done.output_dir}{detail}")
    for engine, line in done.serve:
        print(f"serve ({engine}, not run here): {line}")
    print(f"check it here: autoquant infer --exported {shlex.quote(str(done.output_dir))} --prompt \"Describe a photo.\"")
    return 0


def register(sub) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("export", help="write a run's scheme as a Hugging Face FP8 checkpoint (ModelOpt or "
                       "compressed-tensors format)")
    p.add_argument("run_dir", help="output dir of an `autoquant run` (or its manifest file)")
    p.add_argument("--model-dir", required=True, help="the checkpoint the run was made on")
    p.add_argument("--output-dir", required=True, help="new directory for the exported checkpoint")
    p.add_argument("--device", default="cpu", help="where to run the export: cpu (default), cuda, auto")
    add_arguments(p, ExportOptions, defaults=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ship", help="pick a sweep's trial by a rule and export it (prints why, and how to serve it)",
                       description="Pick one trial of a sweep by a rule and export it. With --max-bits or "
                       "--min-prefill-speedup the lowest KL wins; with only --max-kl/--max-ppl-increase the fewest "
                       "bits win; ties go to the other measure (fewer bits, resp. lower KL), then to the smaller "
                       "trial id. A winner that export cannot take is refused, naming the best trial it can.")
    p.add_argument("sources", nargs="+", help="a sweep directory (or run directories, manifest files, globs)")
    from auto_quantize_model.analysis.pick import ShipRule

    add_arguments(p.add_argument_group("rule: one or more limits, or --trial"), ShipRule, defaults=True)
    p.add_argument("--output-dir", help="new directory for the exported checkpoint (required unless --dry-run)")
    p.add_argument("--model-dir", help="the checkpoint (default: the one the trial's manifest records)")
    p.add_argument("--device", default="cpu", help="where to run the export: cpu (default), cuda, auto")
    add_arguments(p, ExportOptions, defaults=True)
    p.add_argument("--dry-run", action="store_true", help="print the pick and the command, write nothing")
    p.set_defaults(func=cmd_ship)
