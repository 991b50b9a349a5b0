"""Subcommands on the quantized model: infer (generation) and compare (evaluation against BF16)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from auto_quantize_model.cli.common import check_output_dir
from auto_quantize_model.errors import UserError, check_positive

log = logging.getLogger("autoquant")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        p = Path(args.prompts_file)
        if not p.is_file():
            what = "is not a regular file" if p.exists() else "does not exist"
            raise UserError(f"prompts file {p} {what}; give a text file with one prompt per line")
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"prompts file {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
        except OSError as exc:
            raise UserError(f"prompts file {p} cannot be read ({exc.strerror}); give a readable text file") from exc
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw, not through the chat template")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def cmd_infer(args: argparse.Namespace) -> int:
    """Greedy generation with a run's quantized model (or --bf16 for the reference)."""
    from auto_quantize_model.autoquant.rebuild import build_quantized_model, check_matches_model_dir, find_run
    from auto_quantize_model.inference.generate import encode_prompts, greedy_generate
    from auto_quantize_model.models.loading import load_model, read_checkpoint_config
    from auto_quantize_model.models.scope import Scope
    from auto_quantize_model.preflight import check_checkpoint_files

    prompts = _read_prompts(args)
    if not prompts:
        raise UserError("no prompt given; pass --prompt TEXT or --prompts-file FILE")
    check_positive("max-new-tokens", args.max_new_tokens)
    if args.exported:
        return _infer_exported(args, prompts)
    if not args.model_dir:
        raise UserError("--model-dir is required (unless --exported DIR is given)")
    run = None if args.bf16 else find_run(args.run_dir or "")
    read_checkpoint_config(args.model_dir)
    check_checkpoint_files(args.model_dir)  # truncated weights: one line before the load, not a loader traceback
    if run is not None:
        check_matches_model_dir(run, args.model_dir)  # refuse before the load
    loaded = load_model(args.model_dir, Scope.LANGUAGE_MODEL, device=args.device, dtype=args.dtype)
    model = loaded.model if run is None else build_quantized_model(loaded, run)
    tok = loaded.tokenizer
    outs = greedy_generate(model, encode_prompts(tok, prompts, not args.no_chat_template),
                           max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    label = "bf16" if run is None else run.name
    for prompt, ids in zip(prompts, outs):
        print(f"[{label}] {prompt}\n  -> {tok.decode(ids, skip_special_tokens=True)}")
    return 0


def _infer_exported(args: argparse.Namespace, prompts: list[str]) -> int:
    """Greedy generation with an exported checkpoint, FP8 layers executed in FP8 (inference/fp8_linear.py)."""
    from auto_quantize_model.inference.fp8_linear import load_exported_lm
    from auto_quantize_model.inference.generate import encode_prompts, greedy_generate

    if args.bf16 or args.run_dir:
        raise UserError("--exported runs the exported checkpoint alone; drop --bf16/--run-dir")
    ex = load_exported_lm(args.exported, device=args.device)
    tok = ex.tokenizer
    outs = greedy_generate(ex.model, encode_prompts(tok, prompts, not args.no_chat_template),
                           max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    for prompt, ids in zip(prompts, outs):
        print(f"[exported:{ex.name}] {prompt}\n  -> {tok.decode(ids, skip_special_tokens=True)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """BF16 reference and every run on the same held-out captions: comparison.json and .md."""
    from auto_quantize_model.autoquant.rebuild import check_matches_checkpoint, check_matches_model_dir, find_run
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.inference.compare import DEFAULT_PROMPTS, EvalSettings, compare_runs, write_comparison
    from auto_quantize_model.models.loading import load_model, read_checkpoint_config
    from auto_quantize_model.models.scope import Scope
    from auto_quantize_model.preflight import check_checkpoint_files, probe_writable

    out = check_output_dir(args.output_dir)
    settings = EvalSettings(max_samples=args.max_eval_samples, batch_size=args.batch_size, seq_len=args.seq_len,
                            seed=args.seed, max_new_tokens=args.max_new_tokens,
                            chat_template=not args.no_chat_template, control=not args.no_control)
    for flag, value in (("max-eval-samples", settings.max_samples), ("batch-size", settings.batch_size),
                        ("seq-len", settings.seq_len), ("max-new-tokens", settings.max_new_tokens)):
        check_positive(flag, value)
    runs = [find_run(r) for r in args.runs]
    if args.measure:
        from auto_quantize_model.inference.measure import MeasureSettings, check_measurable
        from auto_quantize_model.models.loading import resolve_device

        check_measurable(resolve_device(args.device))  # refuse before any evaluation
        measure = MeasureSettings(batch_size=args.measure_batch_size, seq_len=args.measure_seq_len)
    read_checkpoint_config(args.model_dir)
    for run in runs:  # refuse before loading the model or spending time on any evaluation
        check_matches_model_dir(run, args.model_dir)
    check_checkpoint_files(args.model_dir)
    probe_writable(out, "output dir", "--output-dir")
    source = read_captions(args.eval_captions)
    prompts = _read_prompts(args) or list(DEFAULT_PROMPTS)
    loaded = load_model(args.model_dir, Scope.LANGUAGE_MODEL, device=args.device, dtype=args.dtype)
    for run in runs:  # refuse before spending time on any evaluation
        check_matches_checkpoint(run, loaded)
    comp = compare_runs(loaded, runs, source, settings, prompts)
    if args.measure:
        from auto_quantize_model.inference.measure import measure_runs

        comp["measurement"] = measure_runs(loaded, runs, measure, out)
    js, md = write_comparison(comp, loaded.tokenizer, out)
    print(f"comparison: {js}\n            {md}")
    return 0


def register(sub) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("infer", help="greedy generation with a run's quantized model")
    p.add_argument("--run-dir", help="output dir of an `autoquant run` (omit with --bf16)")
    p.add_argument("--model-dir", help="the checkpoint the run was made on (not needed with --exported)")
    p.add_argument("--exported", help="an `autoquant export` dir: run it with real FP8 matmuls instead")
    _add_generation_arguments(p)
    p.add_argument("--bf16", action="store_true", help="run the unquantized model instead")
    p.set_defaults(func=cmd_infer)
    p = sub.add_parser("compare", help="evaluate runs and the uniform FP8 control against the unquantized model")
    p.add_argument("runs", nargs="+", help="run directories (or manifest files)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--eval-captions", required=True, help="held-out captions (.txt, COCO .json, .jsonl) or 'demo'")
    p.add_argument("--output-dir", default=".", help="where comparison.json/.md go (default: .)")
    p.add_argument("--max-eval-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-control", action="store_true",
                   help="skip the uniform FP8 PTQ control (it needs the first run's calibration captions)")
    p.add_argument("--measure", action="store_true",
                   help="GPU only: export each run and measure prefill/decode tokens/s and weight memory vs BF16")
    p.add_argument("--measure-batch-size", type=int, default=4)
    p.add_argument("--measure-seq-len", type=int, default=512)
    _add_generation_arguments(p)
    p.set_defaults(func=cmd_compare)
