#!/usr/bin/env python3
"""Export and real-FP8 benchmark on a GPU: export time, FP8-vs-fake-quant logits, prefill/decode speed, memory.

On a full-size checkpoint (random weights from make_full_size_checkpoint.py) it runs two AutoQuant schemes
(all LM layers FP8 at 8 bits, about half at 12 bits), exports each with `export_run`, checks the real-FP8
logits against the fake-quant model of the same run, and measures BF16 and both exports the same way
(torch.compile on both sides, median of repeats, CUDA-synchronised). Results go to --output as JSON,
rewritten after every stage.

    python scripts/bench/make_full_size_checkpoint.py --output-dir /tmp/qwen3b
    python scripts/bench/bench_fp8_export.py --model-dir /tmp/qwen3b --work-dir /tmp/fp8bench --output res.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.datasets.calibration import build_calibration_set
from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.export.hf import export_run
from auto_quantize_model.inference.fp8_linear import load_exported_lm
from auto_quantize_model.inference.measure import MeasureSettings, measure_model
from auto_quantize_model.models.loading import load_language_model
from auto_quantize_model.provenance import git_revision, versions

SCHEMES = (("all_fp8", "fp8_autoquant_all_layers_fp8", 8.0), ("top50", "fp8_autoquant_top50", 12.0))


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def logits_check(exported, fake_quant, bf16, vocab: int) -> dict:
    """KL(fake-quant || real FP8) per token, top-1 agreement and max |logit diff| on seeded random ids;
    KL(BF16 || fake-quant) beside it for scale."""
    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(1)).cuda()
    a, b, c = exported(ids).float(), fake_quant(ids).float(), bf16(ids).float()
    kl = (F.softmax(b, -1) * (F.log_softmax(b, -1) - F.log_softmax(a, -1))).sum(-1)
    kl_ref = (F.softmax(c, -1) * (F.log_softmax(c, -1) - F.log_softmax(b, -1))).sum(-1)
    return {"kl_bf16_vs_fake_quant_mean": kl_ref.mean().item(), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": (a - b).abs().max().item(), "max_abs_logit": b.abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--shapes", default="4x512,16x512", help="prefill batch x length list")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--schemes", default="all_fp8,top50")
    args = p.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    settings = MeasureSettings(batch_size=shapes[0][0], seq_len=shapes[0][1], repeats=args.repeats)
    work, out = Path(args.work_dir), Path(args.output)
    res: dict = {"device": torch.cuda.get_device_name(), "model": "Qwen2.5-VL-3B config, RANDOM weights",
                 "command": "python scripts/bench/bench_fp8_export.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": settings.describe(),
                 "shapes": [f"{b}x{s}" for b, s in shapes], "versions": versions(), "git_revision": git_revision(),
                 "runs": {}, "measure": {}}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

    t = time.perf_counter()
    get_cuda_ext_fp8()  # JIT build (~60 s on a fresh machine) outside every timing
    res["fp8_extension_build_s"] = time.perf_counter() - t
    loaded = load_language_model(args.model_dir)
    vocab = loaded.model.lm_head.out_features
    calib = build_calibration_set(loaded.tokenizer, read_captions(str(Path(args.model_dir) / "bench_captions.txt")),
                                  max_samples=32, batch_size=4, seq_len=256, seed=0, device=loaded.device)
    wanted = args.schemes.split(",")
    for label, scheme_name, bits in SCHEMES:
        if label not in wanted:
            continue
        scheme = dataclasses.replace(resolve_scheme(get_scheme(scheme_name), num_score_steps=8, num_calib_steps=8),
                                     name=label, effective_bits=bits)
        t = time.perf_counter()
        run_scheme(loaded, calib, scheme, work / label, cache_dir=work / "cache")
        res["runs"][label] = {"search_s": time.perf_counter() - t}
        _free()
        t = time.perf_counter()
        exp = export_run(work / label, args.model_dir, work / f"export_{label}", device="cuda")
        res["runs"][label].update({"export_s": time.perf_counter() - t, "export_info": exp.info})
        _free()
        fq = build_quantized_model(loaded, find_run(work / label))
        ex = load_exported_lm(work / f"export_{label}", device="cuda")
        res["runs"][label]["logits_vs_fake_quant"] = logits_check(ex.model, fq, loaded.model, vocab)
        del fq, ex
        _free()
        save()
    res["measure"]["bf16"] = measure_model(loaded.model, vocab, settings, shapes)
    save()
    del loaded
    torch._dynamo.reset()
    _free()
    for label in res["runs"]:
        ex = load_exported_lm(work / f"export_{label}", device="cuda")
        res["measure"][label] = {"fp8_layers": len(ex.fp8_layers), **measure_model(ex.model, vocab, settings, shapes)}
        del ex
        _free()
        torch._dynamo.reset()
        save()
    base = res["measure"]["bf16"]
    res["ratios_vs_bf16"] = {
        label: {k: m[k] / base[k] for k in m if k.startswith(("prefill", "decode", "weight"))}
        for label, m in res["measure"].items() if label != "bf16"
    }
    save()
    print(json.dumps(res["ratios_vs_bf16"], indent=1))


if __name__ == "__main__":
    main()
