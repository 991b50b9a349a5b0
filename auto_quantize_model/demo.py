"""The README's main job: a sweep on the embedded tiny model and demo captions, no downloads.

Three distinct experiments x four effective-bits targets run as a Ray Tune sweep on a local Ray, each
trial evaluated against BF16 on held-out demo captions; then the tables are analysed (analysis.md, plots):
FP8 with FP8_DEFAULT_CFG's exclusions (lm_head stays BF16 and outside the budget), FP8 on every layer
(lm_head searched), and an INT4-weight-only + FP8 mix (runs on CPU; NVFP4 would need CUDA). top25/top50
differ from ``full`` only in their default budget, so with the budget swept they would repeat ``full``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from auto_quantize_model.models.tiny import make_tiny_checkpoint

log = logging.getLogger(__name__)

DEMO_SCHEMES = ("fp8_autoquant_full", "fp8_autoquant_all_layers_fp8", "int4w_fp8_autoquant_mix")
DEMO_BITS = (14.0, 12.0, 10.0, 8.0)


def run_demo(output_dir: str | Path, num_workers: int = 0) -> dict[str, Any]:
    """Build (once) the tiny checkpoint, sweep it, analyse the results. Returns the sweep result.

    Running it again on the same directory resumes: finished trials are reported, not re-run.
    """
    from auto_quantize_model.analysis.report import analyze
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import load_sweep_spec

    out = Path(output_dir).resolve()
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        make_tiny_checkpoint(model_dir)
    spec = load_sweep_spec(None, {
        "name": "demo", "model_dir": str(model_dir), "storage_path": str(out / "sweeps"), "captions_path": "demo",
        "schemes": DEMO_SCHEMES, "effective_bits": DEMO_BITS, "max_calib_samples": 64, "batch_size": 4,
        "calib_seq_len": 64, "evaluate": True, "max_eval_samples": 64, "num_workers": num_workers,
    })
    res = run_sweep(spec, resume=spec.sweep_dir.exists())
    ana = analyze([res["sweep_dir"]], out / "analysis")
    res["analysis"] = str(ana["report"])
    return res
