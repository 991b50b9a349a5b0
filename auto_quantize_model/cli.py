"""``autoquant``: argparse subcommands over the same API that Python callers use.

Each subcommand parses, validates, calls the API, and maps :class:`UserError` to one line on stderr
and exit status 2. Nothing here computes anything the API does not.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from auto_quantize_model.errors import UserError

log = logging.getLogger("autoquant")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``autoquant run`` (shared with scripts/qwen/...)."""
    p.add_argument("--scheme-name", required=True, help="catalog scheme (see `autoquant schemes`)")
    p.add_argument("--model-dir", help="local Hugging Face checkpoint (required unless --report-only)")
    p.add_argument("--output-dir", required=True, help="where manifest, report and restore artifact go")
    p.add_argument("--captions-path", default=None,
                   help="captions: .txt (one per line), COCO captions JSON, or JSONL; 'demo' = embedded demo set "
                   "(default: datasets/vlm-quantize-calib/coco2017_captions.txt)")
    p.add_argument("--max-calib-samples", type=int, default=64, help="captions used (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="captions per batch (default 4)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="max tokens per caption (default 256)")
    p.add_argument("--effective-bits", type=float, default=None, help="override the scheme's budget")
    p.add_argument("--auto-quantize-method", choices=("gradient", "kl_div"), default=None, help="override the method")
    p.add_argument("--num-score-steps", type=int, default=None, help="override scoring batches")
    p.add_argument("--num-calib-steps", type=int, default=None, help="override calibration batches")
    p.add_argument("--quant-config", default=None,
                   help="candidate format(s) by name, comma-separated: ModelOpt presets or custom configs")
    p.add_argument("--schemes-file", default=None, help="TOML file with extra [schemes.NAME] tables")
    p.add_argument("--cache-dir", default=None, help="search-score cache (default OUTPUT_DIR/autoquant_cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), bfloat16, float32, float16")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from an existing manifest")
    g = p.add_argument_group("image-caption calibration (searches the whole VLM: vision, merger, language)")
    g.add_argument("--image-captions-path", help='JSONL of {"image": path, "caption": text} (paths relative to it)')
    g.add_argument("--coco-annotations", help="COCO captions_*.json (with --coco-root)")
    g.add_argument("--coco-root", help="folder holding the COCO images")
    g.add_argument("--image-size", type=int, default=None, help="resize images to N x N before processing")


def _check_output_dir(path: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {p} is a file; pass a directory path for --output-dir")
    return p


def cmd_run(args: argparse.Namespace) -> int:
    """Load once, calibrate, search, write manifest/report/restore (or rebuild the report)."""
    from auto_quantize_model.autoquant.manifest import manifest_path

    out = _check_output_dir(args.output_dir)
    if args.report_only:
        return _write_report(manifest_path(out, args.scheme_name))

    from auto_quantize_model.autoquant.run import run_scheme
    from auto_quantize_model.configs import get_scheme, resolve_scheme
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.models.loading import load_language_model, read_checkpoint_config

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
    for flag in ("max_calib_samples", "batch_size", "calib_seq_len"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    read_checkpoint_config(args.model_dir)
    if args.image_captions_path or args.coco_annotations or args.coco_root:
        loaded, calib = _load_for_images(args)
    else:
        captions = read_captions(args.captions_path)
        loaded = load_language_model(args.model_dir, device=args.device, dtype=args.dtype)
        calib = build_calibration_set(
            loaded.tokenizer, captions, max_samples=args.max_calib_samples, batch_size=args.batch_size,
            seq_len=args.calib_seq_len, seed=args.seed, device=loaded.device,
        )
    result = run_scheme(loaded, calib, scheme, out, cache_dir=args.cache_dir, inplace=True)
    m = result.manifest
    print(f"{scheme.name}: {m['num_quantized_layers']}/{m['num_layers']} layers FP8, effective bits "
          f"{m['effective_bits']['measured']:.3f} (target {scheme.effective_bits:g}, met: {m['budget_met']}), "
          f"scores {'computed' if result.scored else 'reused'}")
    print(f"manifest: {result.manifest_path}\nreport:   {result.report_path}\nrestore:  {result.restore_path}")
    return 0


def _load_for_images(args: argparse.Namespace):
    """The whole VLM and image-caption batches (pairs are read before the model loads)."""
    from auto_quantize_model.datasets.image_captions import build_image_calibration_set, read_image_captions
    from auto_quantize_model.models.loading import load_vision_language_model

    if args.image_size is not None and args.image_size <= 0:
        raise UserError(f"--image-size must be a positive integer, got {args.image_size}")
    source = read_image_captions(args.image_captions_path, args.coco_annotations, args.coco_root)
    loaded = load_vision_language_model(args.model_dir, device=args.device, dtype=args.dtype)
    calib = build_image_calibration_set(
        loaded.tokenizer, loaded.image_processor, source, image_token_id=loaded.model.config.image_token_id,
        max_samples=args.max_calib_samples, batch_size=args.batch_size, seq_len=args.calib_seq_len, seed=args.seed,
        image_size=args.image_size, device=loaded.device,
    )
    log.info("whole-VLM search: %d image-caption pairs (%d skipped)", calib.num_samples, len(source.skipped))
    return loaded, calib


def _write_report(manifest: Path, output: Path | None = None) -> int:
    from auto_quantize_model.autoquant.manifest import load_manifest
    from auto_quantize_model.autoquant.report import render_report, report_path
    from auto_quantize_model.io_utils import atomic_write_text

    data = load_manifest(manifest)
    target = output or report_path(manifest.parent)
    atomic_write_text(target, render_report(data))
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


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        p = Path(args.prompts_file)
        if not p.is_file():
            raise UserError(f"prompts file {p} does not exist; give one prompt per line")
        prompts += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def cmd_infer(args: argparse.Namespace) -> int:
    """Greedy generation with a run's quantized model (or --bf16 for the reference)."""
    from auto_quantize_model.inference.generate import encode_prompts, greedy_generate
    from auto_quantize_model.inference.rebuild import build_quantized_model, find_run
    from auto_quantize_model.models.loading import load_language_model, read_checkpoint_config

    prompts = _read_prompts(args)
    if not prompts:
        raise UserError("no prompt given; pass --prompt TEXT or --prompts-file FILE")
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    run = None if args.bf16 else find_run(args.run_dir or "")
    read_checkpoint_config(args.model_dir)
    loaded = load_language_model(args.model_dir, device=args.device, dtype=args.dtype)
    model = loaded.model if run is None else build_quantized_model(loaded, run)
    tok = loaded.tokenizer
    outs = greedy_generate(model, encode_prompts(tok, prompts, not args.no_chat_template),
                           max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    label = "bf16" if run is None else run.name
    for prompt, ids in zip(prompts, outs):
        print(f"[{label}] {prompt}\n  -> {tok.decode(ids, skip_special_tokens=True)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """BF16 reference and every run on the same held-out captions: comparison.json and .md."""
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.inference.compare import DEFAULT_PROMPTS, EvalSettings, compare_runs, write_comparison
    from auto_quantize_model.inference.rebuild import check_matches_checkpoint, find_run
    from auto_quantize_model.models.loading import load_language_model, read_checkpoint_config

    out = _check_output_dir(args.output_dir)
    settings = EvalSettings(max_samples=args.max_eval_samples, batch_size=args.batch_size, seq_len=args.seq_len,
                            seed=args.seed, max_new_tokens=args.max_new_tokens,
                            chat_template=not args.no_chat_template)
    for flag in ("max_samples", "batch_size", "seq_len", "max_new_tokens"):
        if getattr(settings, flag) <= 0:
            raise UserError(f"{flag.replace('_', '-')} must be a positive integer, got {getattr(settings, flag)}")
    runs = [find_run(r) for r in args.runs]
    read_checkpoint_config(args.model_dir)
    source = read_captions(args.eval_captions)
    prompts = _read_prompts(args) or list(DEFAULT_PROMPTS)
    loaded = load_language_model(args.model_dir, device=args.device, dtype=args.dtype)
    for run in runs:  # refuse before spending time on any evaluation
        check_matches_checkpoint(run, loaded)
    comp = compare_runs(loaded, runs, source, settings, prompts)
    js, md = write_comparison(comp, loaded.tokenizer, out)
    print(f"comparison: {js}\n            {md}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Tables, plots and analysis.md from sweep directories or manifests."""
    from auto_quantize_model.analysis.report import analyze

    out = _check_output_dir(args.output_dir)
    res = analyze(args.sources, out, workers=args.workers)
    for src, reason in res["skipped"]:
        print(f"skipped {src}: {reason}", file=sys.stderr)
    print(f"{res['num_trials']} trials -> {out / 'tables'}; report {res['report']}; "
          f"{len(res['plots'])} plots ({res['total_seconds']:.1f} s)")
    return 0


def _floats(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise UserError(f"expected comma-separated numbers, got {text!r}") from exc


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def cmd_sweep(args: argparse.Namespace) -> int:
    """Schemes x effective-bits grid on Ray Tune, one model worker per GPU."""
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import load_sweep_spec

    steps = _floats(args.num_score_steps)
    overrides = {
        "name": args.name, "model_dir": args.model_dir, "storage_path": args.storage_path,
        "captions_path": args.captions_path, "schemes": _names(args.schemes), "effective_bits": _floats(args.effective_bits),
        "methods": _names(args.methods), "num_score_steps": tuple(int(s) for s in steps) if steps else None,
        "num_workers": args.num_workers, "address": args.address, "max_calib_samples": args.max_calib_samples,
        "batch_size": args.batch_size, "calib_seq_len": args.calib_seq_len, "seed": args.seed,
        "evaluate": True if args.evaluate else None, "eval_captions": args.eval_captions,
        "schemes_file": args.schemes_file, "max_failures": args.max_failures,
    }
    spec = load_sweep_spec(args.config, overrides)
    res = run_sweep(spec, resume=args.resume)
    print(res["summary"])
    print(f"results: {res['sweep_dir']} (tables: {res['tables']})")
    failed = [r for r in res["rows"] if r.get("status") != "ok"]
    return 1 if failed and len(failed) == len(res["rows"]) else 0


def cmd_schemes(args: argparse.Namespace) -> int:
    """List the scheme catalog (and, with --quant-configs, every quant config name)."""
    from auto_quantize_model.configs import scheme_catalog
    from auto_quantize_model.modelopt_configs import CUSTOM_QUANT_CONFIGS, available_quant_configs

    if args.quant_configs:
        for name in available_quant_configs():
            print(f"{name}{'  (custom)' if name in CUSTOM_QUANT_CONFIGS else ''}")
        return 0
    for s in scheme_catalog(args.schemes_file).values():
        print(f"{s.name:32} bits={s.effective_bits:<5g} formats={','.join(s.quantization_formats):22} "
              f"method={s.method} score_steps={s.num_score_steps} calib_steps={s.num_calib_steps}"
              + (f" disabled={','.join(s.disabled_layers)}" if s.disabled_layers else ""))
        if s.description:
            print(f"    {s.description}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    """Write the small random Qwen2.5-VL checkpoint used by tests and the demo."""
    from auto_quantize_model.models.tiny import make_tiny_checkpoint

    _check_output_dir(args.output_dir)
    print(f"tiny checkpoint: {make_tiny_checkpoint(args.output_dir, seed=args.seed)}")
    return 0


def cmd_make_demo_images(args: argparse.Namespace) -> int:
    """Coloured shapes with matching captions, as PNGs plus pairs.jsonl."""
    from auto_quantize_model.datasets.demo_images import make_demo_image_captions

    _check_output_dir(args.output_dir)
    if args.num_images <= 0 or args.size < 56:
        raise UserError("--num-images must be positive and --size at least 56 pixels")
    print(f"pairs: {make_demo_image_captions(args.output_dir, n=args.num_images, size=args.size)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A sweep of the four seed schemes x four budgets on the embedded tiny model, then the analysis."""
    from auto_quantize_model.demo import run_demo

    out = _check_output_dir(args.output_dir)
    res = run_demo(out, num_workers=args.num_workers)
    print(res["summary"])
    print(f"sweep: {res['sweep_dir']}\nanalysis: {res['analysis']}")
    return 0


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw, not through the chat template")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def build_parser() -> argparse.ArgumentParser:
    """The ``autoquant`` parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="autoquant", description="Per-layer FP8/BF16 AutoQuant for VLM language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("infer", help="greedy generation with a run's quantized model")
    p.add_argument("--run-dir", help="output dir of an `autoquant run` (omit with --bf16)")
    p.add_argument("--model-dir", required=True, help="the checkpoint the run was made on")
    _add_generation_arguments(p)
    p.add_argument("--bf16", action="store_true", help="run the unquantized model instead")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("compare", help="evaluate runs against BF16 on held-out captions")
    p.add_argument("runs", nargs="+", help="run directories (or manifest files)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--eval-captions", required=True, help="held-out captions (.txt, COCO .json, .jsonl) or 'demo'")
    p.add_argument("--output-dir", default=".", help="where comparison.json/.md go (default: .)")
    p.add_argument("--max-eval-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    _add_generation_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="Parquet tables, plots and analysis.md from manifests")
    p.add_argument("sources", nargs="+", help="sweep/run directories, manifest files or globs")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--workers", type=int, default=2, help="processes for reading manifests (default 2)")
    p.set_defaults(func=cmd_analyze)

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
    p.add_argument("--evaluate", action="store_true", help="perplexity/KL vs BF16 for every trial")
    p.add_argument("--eval-captions", help="held-out captions for --evaluate (default: the calibration source)")
    p.add_argument("--schemes-file")
    p.add_argument("--max-failures", type=int, help="retries of a trial whose worker died (default 2)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.set_defaults(func=cmd_sweep)

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
    return parser


def setup_logging(verbose: bool) -> None:
    """One format for every entry point; chatty third-party loggers kept at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "modelopt", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
