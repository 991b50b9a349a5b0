#!/usr/bin/env python3
"""Export vs evaluated model vs served model, and real-FP8 speed, on one GPU (or a CPU smoke run).

For each scheme (default: `all_fp8` = fp8_autoquant_all_layers_fp8 at 8 bits, `top50` = fp8_autoquant_top50 at
12 bits; fused scales shared, the default) it searches, exports with `export_run`, and measures:

1. per-layer relative output error ||y_export - y_fakequant|| / ||y_fakequant|| of every exported FP8 Linear
   (`Fp8Linear`: `torch._scaled_mm` on a GPU with FP8 tensor cores, and its dequantize path) against the fake-quant
   module of the same run, on the same captured inputs (the fake-quant model's own inputs to that layer on held-out
   caption batches). Goal on the H100: <= 0.5 % in every layer (only `_scaled_mm`'s accumulation is left; the
   dequantize path should be 0 exactly);
2. KL(evaluated || served) per token on held-out captions, where "served" is the export as vLLM loads it
   (tests/engine_load.py: the fused groups' max scales, requantized shards when scales differ, activations times
   1/input_scale) running real FP8 GEMMs, against KL(BF16 || evaluated). Goal: <= 5 %;
3. compiled prefill tokens/s at each --shapes (BF16 vs each export, same settings, CUDA only), decode tokens/s and
   weight memory. Goals on the H100 with shared fused scales: >= 1.3x at 4x512 and >= 1.4x at 16x512.

Results go to --output as JSON, rewritten after every stage. On CPU (the tiny model) stages 1-2 run (bf16, the
dequantize path) and the timings are skipped: a smoke test of the script, not a measurement.

    python scripts/bench/make_full_size_checkpoint.py --output-dir /tmp/qwen3b      # RANDOM weights
    python scripts/bench/bench_fp8_export.py --model-dir /tmp/qwen3b --work-dir /tmp/fp8bench --output res.json
    python scripts/bench/bench_fp8_export.py --model-dir /tmp/tiny --work-dir /tmp/fp8smoke --output smoke.json \
        --device cpu --captions demo
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.datasets.calibration import build_calibration_set
from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.export.hf import export_run
from auto_quantize_model.inference.fp8_linear import Fp8Linear, load_exported_lm, scaled_mm_supported
from auto_quantize_model.inference.measure import MeasureSettings, measure_model
from auto_quantize_model.inference.metrics import _logprobs, _positions, evaluate_against_reference
from auto_quantize_model.models.loading import load_language_model
from auto_quantize_model.provenance import git_revision, versions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from engine_load import engine_load  # noqa: E402 - the engines' load rule, shared with the tests

SCHEMES = {"all_fp8": ("fp8_autoquant_all_layers_fp8", 8.0), "top50": ("fp8_autoquant_top50", 12.0)}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def layer_errors(fake_quant, exported, loaded, batches) -> dict:
    """Relative output error of every exported FP8 layer vs the fake-quant layer on the fake-quant model's inputs."""
    names = [n for n, m in exported.named_modules() if isinstance(m, Fp8Linear)]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [fake_quant.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: captured[n].append(args[0].detach())) for n in names]
    try:
        for batch in batches:
            loaded.forward_step(fake_quant, batch)
    finally:
        for h in hooks:
            h.remove()
    per_layer = {}
    for n in names:
        fq_mod, ex_mod = fake_quant.get_submodule(n), exported.get_submodule(n)
        num = {"scaled_mm": 0.0, "dequantize": 0.0}
        den = 0.0
        for x in captured[n]:
            ref = fq_mod(x).float()
            den += ref.pow(2).sum().item()
            fast = ex_mod.use_scaled_mm
            for path, use in (("scaled_mm", fast), ("dequantize", False)):
                ex_mod.use_scaled_mm = use
                num[path] += (ex_mod(x).float() - ref).pow(2).sum().item()
            ex_mod.use_scaled_mm = fast
        per_layer[n] = {p: (v / den) ** 0.5 if den else 0.0 for p, v in num.items()}
        captured[n].clear()
    worst = max(per_layer, key=lambda n: per_layer[n]["scaled_mm"])
    return {"layers": len(per_layer), "scaled_mm_used": any(exported.get_submodule(n).use_scaled_mm for n in names),
            "max_rel_error": per_layer[worst]["scaled_mm"], "worst_layer": worst,
            "median_rel_error": statistics.median(v["scaled_mm"] for v in per_layer.values()),
            "max_rel_error_dequantize_path": max(v["dequantize"] for v in per_layer.values()),
            "layers_over_0.5pct": sorted(n for n, v in per_layer.items() if v["scaled_mm"] > 0.005),
            "per_layer": per_layer}


@torch.no_grad()
def batch_split_floor(reference, model, batches, forward) -> dict:
    """KL(reference || model) where ``model`` runs each held-out batch one sample at a time: other shapes, so other
    cuBLAS GEMMs and any other kernel chosen by batch size (padding, positions and quantization are the same). With
    ``model`` = ``reference`` it is the model's own floor: how far such a change of arithmetic alone moves this
    model's next-token distributions."""
    total, agree, count = 0.0, 0, 0
    for batch in batches:
        keep = _positions(batch)
        lp_r = _logprobs(forward, reference, batch)[keep]
        rows = batch["input_ids"].shape[0]
        singles = [{k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (rows,) else v) for k, v in batch.items()}
                   for i in range(rows)]
        lp_q = torch.cat([_logprobs(forward, model, one) for one in singles])[keep]
        total += float((lp_r.exp() * (lp_r - lp_q)).sum(-1).clamp(min=0).sum())
        agree += int((lp_r.argmax(-1) == lp_q.argmax(-1)).sum())
        count += int(keep.sum())
    return {"kl_mean": total / max(count, 1), "top1_agreement": agree / max(count, 1)}


def _use_scaled_mm(model, on: bool) -> None:
    """Every exported FP8 Linear of ``model`` in the `_scaled_mm` path (where the device has one) or the dequantize
    path."""
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.use_scaled_mm = on and scaled_mm_supported(m.weight.device)


def served_as_loaded(export_dir: Path, device: str, engine: str = "vllm"):
    """The export with every FP8 Linear holding what ``engine`` holds after loading, run with real FP8 GEMMs."""
    ex = load_exported_lm(export_dir, device=device)
    for prefix, s in engine_load(export_dir, engine).items():
        if prefix in ex.fp8_layers:
            old = ex.model.get_submodule(prefix)
            dev = old.weight.device
            ex.model.set_submodule(prefix, Fp8Linear(s.weight.to(dev), s.weight_scale.to(dev), s.input_scale.to(dev),
                                                     old.bias, torch.bfloat16))
    return ex.model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--captions", default=None, help="caption file (default: MODEL_DIR/bench_captions.txt, else demo)")
    p.add_argument("--schemes", default="all_fp8,top50")
    p.add_argument("--fused-scales", default="shared", choices=("shared", "separate"))
    p.add_argument("--shapes", default="4x512,16x512", help="prefill batch x length list")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--score-steps", type=int, default=8)
    p.add_argument("--no-speed", action="store_true", help="stages 1-2 only (no compiled prefill, decode, memory)")
    args = p.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    settings = MeasureSettings(batch_size=shapes[0][0], seq_len=shapes[0][1], repeats=args.repeats)
    work, out = Path(args.work_dir), Path(args.output)
    captions = args.captions or (str(Path(args.model_dir) / "bench_captions.txt")
                                 if (Path(args.model_dir) / "bench_captions.txt").is_file() else "demo")
    loaded = load_language_model(args.model_dir, device=args.device, dtype="bfloat16")
    dev = loaded.device
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "model": f"{args.model_dir} (full-size 3B from make_full_size_checkpoint.py has RANDOM weights)",
                 "command": " ".join(["python", *sys.argv]), "captions": captions,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": settings.describe(),
                 "fused_scales": args.fused_scales, "versions": versions(), "git_revision": git_revision(),
                 "runs": {}, "measure": {}}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    if dev.type == "cuda":
        from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

        t = time.perf_counter()
        get_cuda_ext_fp8()  # JIT build (~60 s on a fresh machine) outside every timing
        res["fp8_extension_build_s"] = time.perf_counter() - t
    source = read_captions(captions)
    calib = build_calibration_set(loaded.tokenizer, source, max_samples=args.calib_samples, batch_size=4,
                                  seq_len=args.seq_len, seed=0, device=dev)
    held_out = build_calibration_set(loaded.tokenizer, source, max_samples=8, batch_size=2, seq_len=args.seq_len,
                                     seed=1, device=dev)
    for label in args.schemes.split(","):
        base, bits = SCHEMES[label]
        scheme = dataclasses.replace(resolve_scheme(get_scheme(base), num_score_steps=args.score_steps),
                                     name=label, effective_bits=bits, fused_scales=args.fused_scales)
        t = time.perf_counter()
        run_scheme(loaded, calib, scheme, work / label, cache_dir=work / "cache")
        row: dict = {"search_s": time.perf_counter() - t}
        res["runs"][label] = row
        _free(dev)
        t = time.perf_counter()
        exp = export_run(work / label, args.model_dir, work / f"export_{label}", device=str(dev))
        row.update({"export_s": time.perf_counter() - t, "export_info": exp.info})
        fq = build_quantized_model(loaded, find_run(work / label))
        ex = load_exported_lm(work / f"export_{label}", device=str(dev))
        row["layer_errors"] = layer_errors(fq, ex.model, loaded, held_out.batches)
        del ex
        _free(dev)
        served = served_as_loaded(work / f"export_{label}", str(dev))
        with torch.no_grad():
            kl_served = evaluate_against_reference(served, fq, held_out.batches, forward=loaded.forward_step)
            kl_quant = evaluate_against_reference(fq, loaded.model, held_out.batches, forward=loaded.forward_step)
            # The same served model in the dequantize path (bf16 GEMMs of the served codes): what is left without
            # _scaled_mm; and the floors: each model against itself run one sample at a time (batch_split_floor).
            _use_scaled_mm(served, False)
            kl_deq = evaluate_against_reference(served, fq, held_out.batches, forward=loaded.forward_step)
            floor = batch_split_floor(fq, fq, held_out.batches, loaded.forward_step)
            floor_bf16 = batch_split_floor(loaded.model, loaded.model, held_out.batches, loaded.forward_step)
            _use_scaled_mm(served, True)
            floor_served = batch_split_floor(served, served, held_out.batches, loaded.forward_step)
        row["kl"] = {"evaluated_vs_served_mean": kl_served["kl_mean"], "bf16_vs_evaluated_mean": kl_quant["kl_mean"],
                     "ratio": kl_served["kl_mean"] / kl_quant["kl_mean"] if kl_quant["kl_mean"] else None,
                     "top1_evaluated_vs_served": kl_served["top1_agreement"], "num_tokens": kl_served["num_tokens"],
                     "evaluated_vs_served_dequantize_path_mean": kl_deq["kl_mean"],
                     # the floors: each model against itself run one sample at a time (GEMM accumulation alone)
                     "floor_evaluated_batch_split": floor, "floor_bf16_batch_split": floor_bf16,
                     "floor_served_batch_split": floor_served}
        del fq, served
        _free(dev)
        save()
        print(label, json.dumps({k: row["layer_errors"][k] for k in ("max_rel_error", "worst_layer",
                                                                     "max_rel_error_dequantize_path")}),
              json.dumps(row["kl"]), flush=True)
    if args.no_speed:
        res["measure"] = "skipped: --no-speed"
        save()
        return
    if dev.type != "cuda":
        res["measure"] = "skipped: timings need a CUDA GPU (CPU runs the dequantize path)"
        save()
        return
    vocab = loaded.model.lm_head.out_features
    res["measure"]["bf16"] = measure_model(loaded.model, vocab, settings, shapes)
    save()
    del loaded
    torch._dynamo.reset()
    _free(dev)
    for label in res["runs"]:
        ex = load_exported_lm(work / f"export_{label}", device=str(dev))
        res["measure"][label] = {"fp8_layers": len(ex.fp8_layers), **measure_model(ex.model, vocab, settings, shapes)}
        del ex
        torch._dynamo.reset()
        _free(dev)
        save()
    bf16 = res["measure"]["bf16"]
    res["ratios_vs_bf16"] = {label: {k: m[k] / bf16[k] for k in m if k.startswith(("prefill", "decode", "weight"))}
                             for label, m in res["measure"].items() if label != "bf16"}
    save()
    print(json.dumps(res["ratios_vs_bf16"], indent=1))


if __name__ == "__main__":
    main()
