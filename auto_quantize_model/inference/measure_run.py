"""Measure a searched run's real FP8 cost inside a process that already holds the BF16 model (sweep worker).

:func:`to_fp8_model` turns the run's FP8 layers into :class:`Fp8Linear` in memory, with the codes and scales
``autoquant export`` writes (``export/fp8_codes.py``, one function for both: the fake-quant model's own codes,
scales shared across q/k/v and gate/up as the search calibrated them), so no checkpoint is written per trial.
Speed and weight memory are therefore those of the export (a test checks the same FP8 layers and the same
bytes on the tiny model), and its logits equal the run's fake-quant model's bit for bit on CPU in bf16
(tests/test_measure_sweep.py).

The copy shares every BF16 tensor with the model it is built from (only FP8 weights are new memory) and
is dropped after measuring. :class:`CostMeter` measures BF16 and uniform FP8 once per process, lazily, and
each run on demand, all with one :class:`MeasureSettings` on one device.
"""

from __future__ import annotations

import copy
import gc
import itertools
import logging
from typing import Any

import torch
from torch import nn

from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.errors import UserError
from auto_quantize_model.inference.fp8_linear import Fp8Linear, scaled_mm_supported, weight_bytes
from auto_quantize_model.inference.measure import MeasureSettings, check_measurable, measure_model
from auto_quantize_model.models.loading import LoadedModel
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.records.cost import ModelCost, TrialCost, write_measurement

log = logging.getLogger(__name__)

# Calibration batches for the uniform FP8 baseline's static scales: speed does not depend on their values.
UNIFORM_CALIB_STEPS = 4


def check_can_measure(device: torch.device, settings: MeasureSettings) -> None:
    """Refuse a device whose timings would not be FP8 serving speed: no CUDA, or no FP8 tensor cores."""
    check_measurable(device, settings.allow_cpu)
    if device.type == "cuda" and not scaled_mm_supported(device):
        raise UserError(f"measure needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell); "
                        f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}: "
                        "run on such a GPU or drop measure")


def fp8_layer_names(manifest: dict[str, Any]) -> list[str]:
    """The run's FP8 layers; refuses a run with any other quantized format (only FP8/BF16 are measured)."""
    from auto_quantize_model.autoquant.layers import is_quantized_label

    other = sorted({lay["dtype"] for lay in manifest["layers"].values() if is_quantized_label(lay["dtype"])} - {"fp8"})
    if other:
        raise UserError(f"measure runs per-tensor FP8 and BF16 layers only; this run has {', '.join(other)} "
                        "layers: drop measure for this scheme")
    return [name for name, lay in manifest["layers"].items() if lay["dtype"] == "fp8"]


def to_fp8_model(reference: nn.Module, quantized: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``reference`` (BF16 tensors shared, not copied) whose ``names`` are :class:`Fp8Linear` built from
    ``quantized``'s calibrated per-tensor FP8 layers with the export's codes and scales."""
    from auto_quantize_model.export.fp8_codes import fp8_layer_tensors

    # Pre-seeding deepcopy's memo with every tensor copies the module tree but none of its weights.
    memo = {id(t): t for t in itertools.chain(reference.parameters(), reference.buffers())}
    out = copy.deepcopy(reference, memo)
    dtype = next(reference.parameters()).dtype
    with torch.no_grad():
        for name in names:
            q = quantized.get_submodule(name)
            try:
                t = fp8_layer_tensors(q)
            except ValueError as exc:
                raise UserError(f"layer {name} {exc}; measure runs per-tensor FP8 (FP8_DEFAULT_CFG-style) layers only: "
                                "drop measure for this scheme") from exc
            bias = None if q.bias is None else q.bias.detach().clone()
            out.set_submodule(name, Fp8Linear(t.weight, t.weight_scale, t.input_scale, bias, dtype))
    return out.eval()


def _free(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks of the model just measured (the next one compiles afresh)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class CostMeter:
    """Measures runs next to BF16 and uniform FP8 baselines taken once (lazily) on the same device.

    ``loaded`` and ``calib`` are the process's :class:`LoadedModel` and calibration set (the uniform FP8
    baseline is calibrated on their first batches); ``loaded.model`` may live on the host, so callers pass
    the BF16 model on the compute device to each call.
    """

    def __init__(self, loaded: LoadedModel, calib: CalibrationData, settings: MeasureSettings) -> None:
        if loaded.scope is not Scope.LANGUAGE_MODEL:
            raise UserError("measure times the language model; this sweep searches the whole VLM "
                            "(scope vision_language_model): drop measure or search the language model only")
        check_can_measure(loaded.device, settings)
        self.loaded, self.calib, self.settings = loaded, calib, settings
        self.vocab = loaded.model.lm_head.out_features
        self.baselines: tuple[ModelCost, ModelCost] | None = None

    def _measure(self, model: nn.Module, num_fp8: int, label: str) -> ModelCost:
        got = measure_model(model, self.vocab, self.settings)
        cost = ModelCost(float(got["prefill_tokens_per_s"]), float(got["decode_tokens_per_s"]),
                         int(weight_bytes(model)), num_fp8)
        log.info("measured %s: prefill %.4g tok/s, decode %.4g tok/s, LM weights %.4g GB", label,
                 cost.prefill_tokens_per_s, cost.decode_tokens_per_s, cost.lm_weight_bytes / 1e9)
        return cost

    def _measure_fp8(self, reference: nn.Module, quantized: nn.Module, names: list[str], label: str) -> ModelCost:
        fp8 = to_fp8_model(reference, quantized, names)
        try:
            return self._measure(fp8, len(names), label)
        finally:
            del fp8
            _free(self.loaded.device)

    def baseline_costs(self, reference: nn.Module) -> tuple[ModelCost, ModelCost]:
        """(BF16, uniform FP8), measured on the first call and kept."""
        if self.baselines is None:
            from auto_quantize_model.autoquant.layers import UNQUANTIZED, live_layer_formats
            from auto_quantize_model.inference.controls import build_uniform_ptq

            bf16 = self._measure(reference, 0, "bf16")
            _free(self.loaded.device)
            control = build_uniform_ptq(self.loaded, self.calib, UNIFORM_CALIB_STEPS)
            names = [n for n, f in live_layer_formats(control.model).items() if f["weight"] != UNQUANTIZED]
            try:
                uniform = self._measure_fp8(reference, control.model, names, "uniform fp8")
            finally:
                del control
                _free(self.loaded.device)
            self.baselines = (bf16, uniform)
        return self.baselines

    def measure(self, reference: nn.Module, searched: nn.Module, manifest: dict[str, Any],
                run_dir: Any = None) -> TrialCost:
        """The run's cost (``searched`` is its quantized model, ``manifest`` its manifest; neither is changed),
        written as ``measurement.json`` into ``run_dir`` when given."""
        names = fp8_layer_names(manifest)
        bf16, uniform = self.baseline_costs(reference)
        run = self._measure_fp8(reference, searched, names, manifest.get("run_id") or manifest["scheme"]["name"])
        s = self.settings
        cost = TrialCost(run=run, bf16=bf16, uniform_fp8=uniform, device=self.device_name(), batch_size=s.batch_size,
                         seq_len=s.seq_len, compiled=s.compile, settings=s.describe())
        if run_dir is not None:
            write_measurement(run_dir, cost)
        return cost

    def device_name(self) -> str:
        """The GPU's name (``cpu`` in CPU tests)."""
        dev = self.loaded.device
        return torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
