#!/usr/bin/env python3
"""Why one exported FP8 layer differs from its fake-quant layer: each operand compared on its own.

For each ``--layers`` name of a run and its export (``bench_fp8_export.py`` leaves both under its ``--work-dir``), on
the fake-quant model's own inputs to that layer (held-out caption batches):

- the scales: the quantizers' amaxes (and their float32 bits), S as ModelOpt's CPU path computes it
  (``448.0 / amax``: reciprocal times 448) and as its CUDA extension does (a true division), the export's
  ``weight_scale`` and ``input_scale`` and the engines' ``1 / input_scale``;
- the weight: the fake-quant weight against ``code * weight_scale`` of the export (elements that differ);
- the activations: the fake-quant input quantizer's output against the export's quantize-dequantize of the same
  input (elements that differ, and how many of those are FP8 subnormals on either side);
- on a GPU, ModelOpt's two fake-quant paths on the same tensors: its CUDA extension against its eager code.

    python scripts/bench/diag_fp8_layer.py --model-dir /tmp/qwen3b --run-dir /tmp/fp8bench-both/all_fp8 \\
        --export-dir /tmp/fp8bench-both/export_all_fp8 --layers model.layers.23.self_attn.o_proj,lm_head \\
        --output diag.json
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
from auto_quantize_model.autoquant.serving import FP8_DTYPE, FP8_MAX, fp8_scale_pair
from auto_quantize_model.datasets.calibration import build_calibration_set
from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.inference.fp8_linear import load_exported_lm
from auto_quantize_model.models.loading import load_language_model

SMALLEST_NORMAL = 2.0 ** -6  # FP8 E4M3: below this magnitude a code is subnormal


def _bits(x: torch.Tensor) -> str:
    return struct.pack("<f", float(x)).hex()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.float().pow(2).sum())
    return (float((a.float() - b.float()).pow(2).sum()) / den) ** 0.5 if den else 0.0


def _examples(x: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int = 6) -> list[dict]:
    """A few elements where the two quantize-dequantize results differ: the input, its scaled value, both sides."""
    idx = (a.float() != b.float()).reshape(-1).nonzero().reshape(-1)[:k]
    xs, av, bv = x.reshape(-1)[idx].float(), a.reshape(-1)[idx].float(), b.reshape(-1)[idx].float()
    return [{"x": float(xs[i]), "x_bits": _bits(xs[i]), "x_times_S": float(xs[i] * scale.to(xs.device)),
             "fake_quant": float(av[i]), "export": float(bv[i])} for i in range(len(idx))]


def _differ(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = a.float() != b.float()
    return {"elements": a.numel(), "differ": int(d.sum()),
            "max_abs_diff": float((a.float() - b.float()).abs().max()) if a.numel() else 0.0}


@torch.no_grad()
def diagnose(fq_mod, ex_mod, inputs: list[torch.Tensor]) -> dict:
    """Every operand of one layer, fake quant against the export."""
    wq, iq = fq_mod.weight_quantizer, fq_mod.input_quantizer
    out: dict = {}
    for name, q in (("weight", wq), ("input", iq)):
        amax = q.amax.detach().float().reshape(())
        cpu_s, cpu_i = fp8_scale_pair(amax.cpu())
        out[f"{name}_amax"] = {"value": float(amax), "bits": _bits(amax), "dtype": str(q.amax.dtype),
                               "S_cpu_path": float(cpu_s), "S_gpu_path": float(torch.tensor(FP8_MAX) / amax.cpu()),
                               "I": float(cpu_i), "I_bits": _bits(cpu_i)}
    out["export"] = {"weight_scale": float(ex_mod.weight_scale), "weight_scale_bits": _bits(ex_mod.weight_scale),
                     "input_scale": float(ex_mod.input_scale), "input_scale_bits": _bits(ex_mod.input_scale),
                     "engine_multiplier": float(ex_mod.input_scale_inv)}
    w_fq = wq(fq_mod.weight)
    w_ex = (ex_mod.weight.float() * ex_mod.weight_scale).to(fq_mod.weight.dtype)
    out["weight"] = _differ(w_fq, w_ex)
    out["weight"]["examples"] = _examples(fq_mod.weight, torch.tensor(FP8_MAX) / wq.amax.float().reshape(()).cpu(),
                                          w_fq, w_ex)
    out["quantizers"] = {"weight": repr(wq), "input": repr(iq),
                         "output": repr(getattr(fq_mod, "output_quantizer", None)),
                         "module": type(fq_mod).__name__, "export_module": type(ex_mod).__name__}
    # Where the output error comes from: each module against F.linear of its own operands, and the operands.
    mods = {"fq_module_vs_its_operands": 0.0, "export_module_vs_its_operands": 0.0, "operands_fq_vs_export": 0.0,
            "module_fq_vs_export": 0.0}
    fast = getattr(ex_mod, "use_scaled_mm", False)
    ex_mod.use_scaled_mm = False
    acts = {"elements": 0, "differ": 0, "differ_subnormal": 0, "max_abs_diff": 0.0}
    paths = {"elements": 0, "differ": 0}
    try:
        for x in inputs:
            a_fq = iq(x)
            codes = ex_mod._quantize_input(x.reshape(-1, x.shape[-1]))
            a_ex = (codes.float() * ex_mod.input_scale).to(x.dtype).reshape(x.shape)
            d = a_fq.float() != a_ex.float()
            acts["elements"] += x.numel()
            acts["differ"] += int(d.sum())
            small = (codes.float().abs() < SMALLEST_NORMAL).reshape(x.shape)
            acts["differ_subnormal"] += int((d & small).sum())
            acts["max_abs_diff"] = max(acts["max_abs_diff"], float((a_fq.float() - a_ex.float()).abs().max()))
            if len(acts.setdefault("examples", [])) < 6:
                acts["examples"] += _examples(x, torch.tensor(FP8_MAX) / iq.amax.float().reshape(()).cpu(), a_fq, a_ex)
            y_fq, y_ex = fq_mod(x), ex_mod(x)
            lin_fq = torch.nn.functional.linear(a_fq, w_fq, fq_mod.bias)
            lin_ex = torch.nn.functional.linear(a_ex, w_ex, ex_mod.bias)
            for key, (a, b) in {"fq_module_vs_its_operands": (y_fq, lin_fq),
                                "export_module_vs_its_operands": (y_ex, lin_ex),
                                "operands_fq_vs_export": (lin_ex, lin_fq), "module_fq_vs_export": (y_ex, y_fq)}.items():
                mods[key] = max(mods[key], _rel(a, b))
            if x.is_cuda:  # ModelOpt's own two paths on the same input
                from modelopt.torch.quantization.extensions import get_cuda_ext_fp8
                from modelopt.torch.quantization.tensor_quant import fp8_eager

                ext = get_cuda_ext_fp8()
                kernel, eager = ext.fake_e4m3fy(x, iq.amax), fp8_eager(x, iq.amax)
                paths["elements"] += x.numel()
                paths["differ"] += int((kernel.float() != eager.float()).sum())
    finally:
        ex_mod.use_scaled_mm = fast
    out["activations"] = acts
    out["relative_errors_max_over_batches"] = mods
    if paths["elements"]:
        out["modelopt_kernel_vs_eager_activations"] = paths
    out["fp8_max"] = FP8_MAX
    out["fp8_dtype"] = str(FP8_DTYPE)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--export-dir", required=True)
    p.add_argument("--layers", required=True, help="comma-separated module names")
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--captions", default="demo")
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    loaded = load_language_model(args.model_dir, device=args.device, dtype="bfloat16")
    fq = build_quantized_model(loaded, find_run(args.run_dir))
    ex = load_exported_lm(args.export_dir, device=str(loaded.device))
    names = [n for n in args.layers.split(",") if n]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [fq.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: captured[n].append(a[0].detach()))
             for n in names]
    held_out = build_calibration_set(loaded.tokenizer, read_captions(args.captions), max_samples=8, batch_size=2,
                                     seq_len=args.seq_len, seed=1, device=loaded.device)
    with torch.no_grad():
        for batch in held_out.batches:
            loaded.forward_step(fq, batch)
    for h in hooks:
        h.remove()
    res = {"command": " ".join(["python", *sys.argv]), "device": str(loaded.device),
           "layers": {n: diagnose(fq.get_submodule(n), ex.model.get_submodule(n), captured[n]) for n in names}}
    Path(args.output).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
