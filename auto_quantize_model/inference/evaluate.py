"""Evaluate one run's model against its unquantized reference (``compare``, the sweep's workers, the uniform-PTQ
control), and attach the result to the run. Its own module so that ``compare`` and ``controls`` both use it
without importing each other."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from auto_quantize_model.autoquant.manifest import EVALUATION_FILE
from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.inference.metrics import error_vs_sensitivity, evaluate_against_reference, layer_output_errors
from auto_quantize_model.io_utils import atomic_write_json
from auto_quantize_model.models.steps import ForwardStep


def evaluate_run(
    model: nn.Module, reference: nn.Module, data: CalibrationData, manifest: dict[str, Any] | None = None, *,
    forward: ForwardStep,
) -> dict[str, Any]:
    """Output metrics of ``model`` against ``reference`` on ``data``, both run by ``forward`` (the loaded model's
    ``forward_step``), plus per-layer error (and its correlation with the run's sensitivity scores when the
    manifest is given)."""
    t = time.perf_counter()
    metrics = evaluate_against_reference(model, reference, data.batches, forward=forward)
    errors = layer_output_errors(model, data.batches, forward=forward)
    out: dict[str, Any] = {"metrics": metrics, "layer_errors": errors}
    if manifest is not None:
        out["error_vs_sensitivity"] = error_vs_sensitivity(manifest, errors)
    out["metrics"]["eval_seconds"] = time.perf_counter() - t
    return out


def write_evaluation(run_dir: str | Path, result: dict[str, Any]) -> Path:
    """Attach an :func:`evaluate_run` result to its run (``evaluation.json`` beside the manifest)."""
    return atomic_write_json(Path(run_dir) / EVALUATION_FILE, {
        "metrics": {k: v for k, v in result["metrics"].items()},
        "error_vs_sensitivity": {k: v for k, v in result.get("error_vs_sensitivity", {}).items() if k != "groups"},
        "layer_errors": result["layer_errors"],
    })
