"""``autoquant export``: a run's scheme as a deployable Hugging Face checkpoint (ModelOpt unified format), equal to
the evaluated model."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    """Export the whole VLM with the run's FP8/BF16 layer choice; print where it went."""
    from auto_quantize_model.export.hf import export_run

    result = export_run(args.run_dir, args.model_dir, args.output_dir, device=args.device)
    w = result.info["weights"]
    print(f"export: {result.output_dir} ({result.info['layers']['fp8']}/{result.info['layers']['total']} layers FP8, "
          f"{result.info['serving']['fused_scales']} fused scales, language model "
          f"{w['language_model_bytes'] / 1e9:.3f} GB, lm_head {result.info['lm_head']})")
    return 0


def register(sub) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("export", help="write a run's scheme as a Hugging Face FP8 checkpoint (ModelOpt format)")
    p.add_argument("run_dir", help="output dir of an `autoquant run` (or its manifest file)")
    p.add_argument("--model-dir", required=True, help="the checkpoint the run was made on")
    p.add_argument("--output-dir", required=True, help="new directory for the exported checkpoint")
    p.add_argument("--device", default="cpu", help="where to run the export: cpu (default), cuda, auto")
    p.set_defaults(func=cmd_export)
