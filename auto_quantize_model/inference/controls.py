"""The control every evaluation carries: uniform FP8 post-training quantization (PTQ).

``mtq.quantize`` with ModelOpt's ``FP8_DEFAULT_CFG`` as shipped: every Linear FP8 except what the
format's own name patterns exclude (``*lm_head*`` and friends), max calibration on the same
calibration batches an AutoQuant run used, with the scales engines serve (shared q/k/v and gate/up
scales, exact-reciprocal FP8 scales: autoquant/serving.py). Beside the unquantized reference it shows what AutoQuant
buys over plain FP8 at the effective bits each gets.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from auto_quantize_model.autoquant.layers import UNQUANTIZED, linear_layers, live_layer_formats
from auto_quantize_model.datasets.calibration import CalibrationSet
from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.io_utils import atomic_write_json, sha256_json
from auto_quantize_model.models.loading import LoadedModel

log = logging.getLogger(__name__)

CONTROL_FORMAT = "FP8_DEFAULT_CFG"
CONTROL_NAME = "uniform_fp8_ptq"
CONTROL_SUFFIX = "_control.json"
CONTROL_SCHEMA_VERSION = 3  # 2: calibrated with shared fused scales (autoquant/serving.py); the id names weights;
# 3: FP8 scales equal on the CPU and GPU paths (serving.exact_reciprocal_amax)
# Served semantics of the control (autoquant/serving.py), part of its id: a record calibrated otherwise is not reused.
CONTROL_FUSED_SCALES = "shared"


@dataclass
class Control:
    """A calibrated uniform-PTQ model and the facts a table row needs about it."""

    model: nn.Module
    name: str
    quant_format: str
    num_calib_steps: int
    calibration_hash: str
    effective_bits: float
    num_quantized_layers: int
    num_layers: int
    quantized_layers: list[str]
    calibrate_seconds: float

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts (no model)."""
        return {
            "name": self.name, "quant_format": self.quant_format, "num_calib_steps": self.num_calib_steps,
            "calibration_hash": self.calibration_hash, "effective_bits": self.effective_bits,
            "num_quantized_layers": self.num_quantized_layers, "num_layers": self.num_layers,
            "unquantized_layers": sorted(set(linear_layers(self.model)) - set(self.quantized_layers)),
            "calibrate_seconds": self.calibrate_seconds,
        }


def control_id(calib: CalibrationData, num_calib_steps: int, weights_fingerprint: str,
               quant_format: str = CONTROL_FORMAT) -> str:
    """Deterministic id of a control: same weights, format, served scales, data and steps = same control (a resumed
    sweep reuses a record on disk only under the same id)."""
    h = sha256_json({"format": quant_format, "calibration": calib.token_hash, "steps": num_calib_steps,
                     "weights": weights_fingerprint, "fused_scales": CONTROL_FUSED_SCALES,
                     "schema_version": CONTROL_SCHEMA_VERSION})[:8]
    return f"{CONTROL_NAME}-c{num_calib_steps}-{h}"


def _weight_bits(label: str) -> float:
    """Storage bits per weight of a live quantizer label (scales not counted, as in AutoQuant's cost)."""
    return {UNQUANTIZED: 16.0, "fp8": 8.0, "mxfp8": 8.0, "int8": 8.0, "nvfp4": 4.0, "mxfp4": 4.0, "int4": 4.0}.get(
        label, 16.0)


def build_uniform_ptq(
    loaded: LoadedModel, calib: CalibrationData, num_calib_steps: int | None = None,
    quant_format: str = CONTROL_FORMAT,
) -> Control:
    """Quantize a copy of ``loaded.model`` with ``quant_format``'s own defaults, calibrated on the
    first ``num_calib_steps`` batches of ``calib`` (all when None), the batches AutoQuant calibrates on."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, quant_format))
    steps = len(calib.batches) if num_calib_steps is None else min(num_calib_steps, len(calib.batches))
    batches = calib.batches[:steps]
    t = time.perf_counter()
    from auto_quantize_model.models.copies import copy_to_device

    # The sweep worker may keep its pristine model in pinned host memory: compute where the batches are (uploaded
    # straight from the host tensors, without a second host copy first).
    model = copy_to_device(loaded.model, loaded.device)

    def forward_loop(m: nn.Module) -> None:
        for batch in batches:
            loaded.forward_step(m, batch)

    from auto_quantize_model.autoquant.attention_quantizers import as_in_a_fresh_process
    from auto_quantize_model.autoquant.serving import serving_calibration

    # Served semantics as for every search (autoquant/serving.py): the control is what an engine would serve.
    with serving_calibration(CONTROL_FUSED_SCALES), as_in_a_fresh_process(model):
        model = mtq.quantize(model, cfg, forward_loop)
    seconds = time.perf_counter() - t
    live = live_layer_formats(model)
    layers = linear_layers(model)
    sizes = {n: int(layers[n].weight.numel()) for n in live}
    quantized = [n for n, f in live.items() if f["weight"] != UNQUANTIZED]
    bits = sum(sizes[n] * _weight_bits(live[n]["weight"]) for n in live) / sum(sizes.values())
    log.info("control %s: %d/%d Linears quantized, %.3f effective bits, calibrated on %d batches in %.2fs",
             quant_format, len(quantized), len(live), bits, steps, seconds)
    return Control(model, CONTROL_NAME, quant_format, steps, calib.token_hash, bits, len(quantized), len(live),
                   quantized, seconds)


def calibration_from_manifest(loaded: LoadedModel, manifest: dict[str, Any]) -> CalibrationSet:
    """Rebuild the calibration batches a run recorded (source, samples, batch, length, seed, chat
    template) and check they tokenize to the same hash, so the control sees exactly the run's data."""
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.errors import UserError

    cal = manifest["calibration"]
    if cal.get("kind") == "image_caption" or cal.get("source_format") not in ("text", "jsonl", "coco_json"):
        raise UserError(f"run {manifest.get('run_id') or manifest['scheme']['name']} calibrated on "
                        f"{cal.get('kind') or cal.get('source_format')!r} data; the uniform FP8 control needs "
                        "caption text: pass --no-control")
    calib = build_calibration_set(loaded.tokenizer, read_captions(cal["source_path"]), max_samples=cal["num_samples"],
                                  batch_size=cal["batch_size"], seq_len=cal["seq_len"], seed=cal["seed"],
                                  device=loaded.device, chat_template=bool(cal.get("chat_template")))
    if calib.token_hash != cal["token_hash"]:
        raise UserError(f"calibration file {cal['source_path']} no longer tokenizes to the run's data (token hash "
                        "differs); restore it or pass --no-control")
    return calib


def evaluate_control(
    loaded: LoadedModel, calib: CalibrationData, eval_data: CalibrationData, reference: nn.Module,
    num_calib_steps: int | None, trials_dir: str | Path, tables_root: str | Path, sweep_id: str | None,
) -> Path:
    """A sweep's control: build, evaluate on the sweep's held-out data, write its record and its
    trials-table row. One per calibration-step count; a record already on disk is reused (resume)."""
    from auto_quantize_model.inference.evaluate import evaluate_run
    from auto_quantize_model.records.tables import control_trials_table, write_table_file

    steps = len(calib.batches) if num_calib_steps is None else min(num_calib_steps, len(calib.batches))
    cid = control_id(calib, steps, loaded.weights_fingerprint)
    path = Path(trials_dir) / cid / f"{cid}{CONTROL_SUFFIX}"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    control = build_uniform_ptq(loaded, calib, steps)
    metrics = evaluate_run(control.model, reference, eval_data, forward=loaded.forward_step)["metrics"]
    record = {"schema_version": CONTROL_SCHEMA_VERSION, "kind": "control", "sweep_id": sweep_id, "trial_id": cid,
              "control": control.describe(), "model": loaded.describe(), "metrics": metrics}
    write_table_file(tables_root, "trials", CONTROL_NAME, cid, control_trials_table(record, str(path)))
    return atomic_write_json(path, record)
