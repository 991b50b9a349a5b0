"""Subcommands around single runs: schemes, run, report, make-tiny-model, make-demo-images, demo."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from auto_quantize_model.cli.common import check_output_dir
from auto_quantize_model.datasets.settings import CalibrationSettings
from auto_quantize_model.errors import UserError, check_positive
from auto_quantize_model.preflight import probe_writable
from auto_quantize_model.settings import add_arguments, overrides_from_args

log = logging.getLogger("autoquant")
# Demo images are small synthetic shapes: a bound keeps a typo (--size 2000000) from exhausting memory or disk.
MAX_DEMO_IMAGES = 100_000
MAX_DEMO_IMAGE_SIZE = 2048


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``autoquant run`` (shared with scripts/qwen/...)."""
    p.add_argument("--scheme-name", required=True,
                   help="catalog scheme, or a ModelOpt AutoQuantize recipe (YAML path or built-in name; "
                   "see `autoquant schemes`)")
    p.add_argument("--model-dir", help="local Hugging Face checkpoint (required unless --report-only)")
    p.add_argument("--output-dir", required=True, help="where manifest, report and restore artifact go")
    add_arguments(p, CalibrationSettings, defaults=True)  # the sweep's calibration settings too
    p.add_argument("--effective-bits", type=float, default=None, help="override the scheme's budget")
    p.add_argument("--auto-quantize-method", choices=("gradient", "kl_div"), default=None, help="override the method")
    p.add_argument("--num-score-steps", type=int, default=None, help="override scoring batches")
    p.add_argument("--num-calib-steps", type=int, default=None,
                   help="calibration batches (default: every loaded batch)")
    p.add_argument("--quant-config", default=None,
                   help="candidate format(s) by name, comma-separated: ModelOpt presets or custom configs")
    p.add_argument("--schemes-file", default=None, help="TOML file with extra [schemes.NAME] tables")
    p.add_argument("--cache-dir", default=None, help="search-score cache (default OUTPUT_DIR/autoquant_cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), bfloat16, float32, float16")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from an existing manifest")
    g = p.add_argument_group("image-caption calibration (searches the whole VLM: vision, merger, language)")
    g.add_argument("--image-captions-path", help='JSONL of {"image": path, "caption": text} (paths relative to it)')
    g.add_argument("--coco-annotations", help="COCO captions_*.json (with --coco-root)")
    g.add_argument("--coco-root", help="folder holding the COCO images")
    g.add_argument("--image-size", type=int, default=None, help="resize images to N x N before processing")


def cmd_run(args: argparse.Namespace) -> int:
    """Load once, calibrate, search, write manifest/report/restore (or rebuild the report)."""
    from auto_quantize_model.autoquant.manifest import manifest_path

    out = check_output_dir(args.output_dir)
    if args.report_only:
        return _write_report(manifest_path(out, _scheme_file_name(args.scheme_name, args.schemes_file)))

    from auto_quantize_model.autoquant.run import run_scheme
    from auto_quantize_model.configs import get_scheme, resolve_scheme
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.models.loading import load_model, read_checkpoint_config
    from auto_quantize_model.models.scope import Scope
    from auto_quantize_model.preflight import check_checkpoint_files

    if not args.model_dir:
        raise UserError("--model-dir is required (a local Hugging Face checkpoint) unless --report-only is given")
    # Every input is checked before the model loads, so bad input costs seconds, not a load.
    scheme = resolve_scheme(
        get_scheme(args.scheme_name, args.schemes_file),
        effective_bits=args.effective_bits,
        method=args.auto_quantize_method,
        num_score_steps=args.num_score_steps,
        num_calib_steps=args.num_calib_steps,
        quant_config=args.quant_config,
    )
    data = CalibrationSettings(**overrides_from_args(args, CalibrationSettings))  # checks its ranges
    read_checkpoint_config(args.model_dir)
    check_checkpoint_files(args.model_dir)
    probe_writable(out, "output dir", "--output-dir")
    if args.cache_dir:
        probe_writable(args.cache_dir, "cache dir", "--cache-dir")
    if args.image_captions_path or args.coco_annotations or args.coco_root:
        loaded, calib = _load_for_images(args, data)
    else:
        captions = read_captions(data.captions_path)
        loaded = load_model(args.model_dir, Scope.LANGUAGE_MODEL, device=args.device, dtype=args.dtype)
        calib = build_calibration_set(
            loaded.tokenizer, captions, max_samples=data.max_calib_samples, batch_size=data.batch_size,
            seq_len=data.calib_seq_len, seed=data.seed, device=loaded.device, chat_template=data.chat_template,
        )
    result = run_scheme(loaded, calib, scheme, out, cache_dir=args.cache_dir, inplace=True)
    m = result.manifest
    print(f"{scheme.name}: {m['num_quantized_layers']}/{m['num_layers']} layers FP8, effective bits "
          f"{m['effective_bits']['measured']:.3f} (target {scheme.effective_bits:g}, met: {m['budget_met']}), "
          f"scores {'computed' if result.scored else 'reused'}")
    print(f"manifest: {result.manifest_path}\nreport:   {result.report_path}\nrestore:  {result.restore_path}")
    return 0


def _scheme_file_name(ref: str, schemes_file: str | None) -> str:
    """The name a run's files carry: the scheme's own name (a recipe's file stem), else ``ref`` as given."""
    from auto_quantize_model.configs import get_scheme

    try:
        return get_scheme(ref, schemes_file).name
    except UserError:
        return ref  # the missing manifest is then the error the user sees


def _load_for_images(args: argparse.Namespace, data: CalibrationSettings):
    """The whole VLM and image-caption batches (pairs are read before the model loads)."""
    from auto_quantize_model.datasets.image_captions import build_image_calibration_set, read_image_captions
    from auto_quantize_model.models.loading import load_model
    from auto_quantize_model.models.scope import Scope

    if args.image_size is not None:
        check_positive("image-size", args.image_size)
    source = read_image_captions(args.image_captions_path, args.coco_annotations, args.coco_root)
    if not source.pairs:
        raise UserError(f"no usable image-caption pairs in {source.path}; give records like "
                        '{"image": "a.jpg", "caption": "..."} (one per line)')
    loaded = load_model(args.model_dir, Scope.WHOLE_VLM, device=args.device, dtype=args.dtype)
    calib = build_image_calibration_set(
        loaded.tokenizer, loaded.image_processor, source, image_token_id=loaded.model.config.image_token_id,
        max_samples=data.max_calib_samples, batch_size=data.batch_size, seq_len=data.calib_seq_len, seed=data.seed,
        image_size=args.image_size, device=loaded.device,
    )
    log.info("whole-VLM search: %d image-caption pairs (%d skipped)", calib.num_samples, len(source.skipped))
    return loaded, calib


def _write_report(manifest: Path, output: Path | None = None) -> int:
    from auto_quantize_model.autoquant.manifest import load_manifest
    from auto_quantize_model.autoquant.report import render_report, report_path
    from auto_quantize_model.io_utils import atomic_write_text

    try:
        data = load_manifest(manifest)
        text = render_report(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # Shape-valid JSON with wrong types inside: refuse by name rather than with a traceback.
        raise UserError(f"manifest {manifest} is malformed ({exc.__class__.__name__}: {str(exc)[:120]}); "
                        "re-run the scheme to rewrite it") from exc
    target = output or report_path(manifest.parent)
    if target.is_dir():
        raise UserError(f"report path {target} is a directory; pass a file path for --output")
    probe_writable(target.parent, "report dir", "--output")
    atomic_write_text(target, text)
    print(f"report: {target}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild a report from a manifest file (or the single manifest in a directory)."""
    from auto_quantize_model.autoquant.manifest import MANIFEST_SUFFIX

    p = Path(args.manifest)
    if p.is_dir():
        found = sorted(p.glob(f"*{MANIFEST_SUFFIX}"))
        if len(found) != 1:
            raise UserError(f"{p} holds {len(found)} manifests; pass one *{MANIFEST_SUFFIX} file")
        p = found[0]
    return _write_report(p, Path(args.output) if args.output else None)


def cmd_schemes(args: argparse.Namespace) -> int:
    """List the scheme catalog (and, with --quant-configs, every quant config name)."""
    from auto_quantize_model.configs import scheme_catalog
    from auto_quantize_model.modelopt_configs import CUSTOM_QUANT_CONFIGS, available_quant_configs

    if args.quant_configs:
        for name in available_quant_configs():
            print(f"{name}{'  (custom)' if name in CUSTOM_QUANT_CONFIGS else ''}")
        return 0
    from auto_quantize_model.configs.recipes import builtin_auto_quantize_recipes

    for s in scheme_catalog(args.schemes_file).values():
        setup = s.search_setup()
        print(f"{s.name:32} bits={s.effective_bits:<5g} formats={','.join(s.quantization_formats):22} "
              f"method={s.method} fused_scales={s.fused_scales} score_steps={s.num_score_steps} "
              f"calib_steps={s.num_calib_steps or 'all'} "
              f"excluded_patterns={len(setup.disabled)} (budget: {len(setup.cost_excluded)})"
              + (f" disabled={','.join(s.disabled_layers)}" if s.disabled_layers else ""))
        if s.description:
            print(f"    {s.description}")
    print("ModelOpt AutoQuantize recipes (any also as --scheme-name or in a sweep's schemes; or a YAML path):")
    for name in builtin_auto_quantize_recipes():
        print(f"    {name}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    """Write the small random Qwen2.5-VL checkpoint used by tests and the demo."""
    from auto_quantize_model.models.tiny import make_tiny_checkpoint

    probe_writable(check_output_dir(args.output_dir), "output dir", "--output-dir")
    print(f"tiny checkpoint: {make_tiny_checkpoint(args.output_dir, seed=args.seed)}")
    return 0


def cmd_make_demo_images(args: argparse.Namespace) -> int:
    """Coloured shapes with matching captions, as PNGs plus pairs.jsonl."""
    from auto_quantize_model.datasets.demo_images import make_demo_image_captions

    check_output_dir(args.output_dir)
    if not 0 < args.num_images <= MAX_DEMO_IMAGES or not 56 <= args.size <= MAX_DEMO_IMAGE_SIZE:
        raise UserError(f"--num-images must be 1 to {MAX_DEMO_IMAGES:,} and --size 56 to {MAX_DEMO_IMAGE_SIZE} pixels "
                        f"(got {args.num_images} and {args.size})")
    probe_writable(args.output_dir, "output dir", "--output-dir")
    print(f"pairs: {make_demo_image_captions(args.output_dir, n=args.num_images, size=args.size)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A sweep of the four seed schemes x four budgets on the embedded tiny model, then the analysis."""
    from auto_quantize_model.demo import run_demo

    out = check_output_dir(args.output_dir)
    res = run_demo(out, num_workers=args.num_workers)
    print(res["summary"])
    print(f"sweep: {res['sweep_dir']}\nanalysis: {res['analysis']}")
    return 0


def register(sub) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("schemes", help="list the scheme catalog")
    p.add_argument("--schemes-file", default=None)
    p.add_argument("--quant-configs", action="store_true", help="list quant config names instead")
    p.set_defaults(func=cmd_schemes)
    p = sub.add_parser("run", help="run one scheme on a checkpoint")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="rebuild the Markdown report from a manifest")
    p.add_argument("manifest", help="a *_quant_manifest.json file, or a run directory holding one")
    p.add_argument("--output", default=None, help="report path (default: beside the manifest)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("make-tiny-model", help="write a small random Qwen2.5-VL checkpoint")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)
    p = sub.add_parser("make-demo-images", help="write the procedural image-caption demo set (shapes, not COCO)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--size", type=int, default=112)
    p.set_defaults(func=cmd_make_demo_images)
    p = sub.add_parser("demo", help="a sweep on the embedded tiny model, local Ray (no downloads)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--num-workers", type=int, default=0, help="model workers (default: one per GPU, else 1)")
    p.set_defaults(func=cmd_demo)
