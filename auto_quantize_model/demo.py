"""The README's main job: every catalog scheme on the embedded tiny model, no downloads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.configs import AUTOQUANT_FP8_SCHEMES, resolve_scheme
from auto_quantize_model.datasets.calibration import build_calibration_set
from auto_quantize_model.datasets.captions import DEMO, read_captions
from auto_quantize_model.inference.compare import EvalSettings, compare_runs, write_comparison, write_evaluation
from auto_quantize_model.inference.rebuild import find_run
from auto_quantize_model.models.loading import load_language_model
from auto_quantize_model.models.tiny import make_tiny_checkpoint

log = logging.getLogger(__name__)


def run_demo(output_dir: str | Path, device: str = "auto") -> list[dict[str, Any]]:
    """Build (once) the tiny checkpoint, then run each scheme into ``output_dir/<scheme>``.

    All schemes share one score cache, so the three FP8_DEFAULT_CFG schemes score once and the
    other two only re-solve; the summary rows say which. Then every run is evaluated against the
    BF16 reference on held-out demo captions (comparison.json/.md in ``output_dir``).
    """
    out = Path(output_dir)
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        make_tiny_checkpoint(model_dir)
    loaded = load_language_model(model_dir, device=device)
    calib = build_calibration_set(loaded.tokenizer, read_captions(DEMO), max_samples=64, batch_size=4, seq_len=64,
                                  seed=0, device=loaded.device)
    rows, runs = [], []
    for scheme in AUTOQUANT_FP8_SCHEMES.values():
        result = run_scheme(loaded, calib, resolve_scheme(scheme), out / scheme.name, cache_dir=out / "autoquant_cache")
        runs.append(find_run(out / scheme.name))
        m = result.manifest
        rows.append({
            "scheme": scheme.name, "target": scheme.effective_bits, "bits": m["effective_bits"]["measured"],
            "fp8": m["num_quantized_layers"], "layers": m["num_layers"], "met": m["budget_met"],
            "scores": "computed" if result.scored else "reused",
        })
    # Held-out evaluation: compare_runs drops every caption a run calibrated on.
    comp = compare_runs(loaded, runs, read_captions(DEMO), EvalSettings(max_samples=64, seq_len=64, max_new_tokens=16))
    write_comparison(comp, loaded.tokenizer, out)
    for row, run, res in zip(rows, runs, comp["runs"]):
        write_evaluation(run.run_dir, res)  # so `autoquant analyze` tables carry perplexity and KL
        row.update({k: res["metrics"][k] for k in ("perplexity", "kl_mean", "top1_agreement")})
    rows.append({"scheme": "bf16 (reference)", "target": 16.0, "bits": 16.0, "fp8": 0, "layers": rows[0]["layers"],
                 "met": True, "scores": "-", "perplexity": comp["reference"]["metrics"]["perplexity"],
                 "kl_mean": 0.0, "top1_agreement": 1.0})
    return rows
