"""FP8 codes and scales of a fake-quantized layer, computed exactly as ModelOpt's fake quantization computes them.

The one function the export (``export/hf.py``) and the sweep's in-memory measurement
(``inference/measure_run.py``) both use, so what is exported, what is measured and what was evaluated are the
same numbers. ModelOpt's fake quantization (``modelopt/torch/quantization/tensor_quant.py`` ``_fp8_eager``; the
CUDA kernel ``tensor_quant_gpu_fp8.cu`` ``fake_e4m3fy`` computes the same, saturating instead of clamping) does,
in float32::

    S = 448 / amax            (amax <= 2^-24: S = 448)
    I = 1 / S
    code = fp8_e4m3fn(clamp(x.float() * S, -448, 448))
    fake_quant(x) = (code.float() * I).to(x.dtype)

So the exported weight is ``code`` of the weight, ``weight_scale`` is the weight's ``I`` and ``input_scale`` the
input's ``I``: a loader computing ``weight.float() * weight_scale`` gets the fake-quant weight bit for bit.
ModelOpt's own exporter instead divides the weight by ``amax / 448`` in the model dtype (bf16), so a few % of
its codes are one FP8 step away from the evaluated ones (``quant_utils.to_quantized_weight``); its tensors are
overwritten with these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from auto_quantize_model.autoquant.serving import FP8_DTYPE, FP8_MAX, fp8_scale_pair, is_fp8_per_tensor


@dataclass(frozen=True)
class Fp8Tensors:
    """What a per-tensor FP8 Linear is stored as: E4M3 weight codes and the two float32 dequantization scales."""

    weight: torch.Tensor  # float8_e4m3fn, the Linear's weight shape
    weight_scale: torch.Tensor  # float32 scalar: the weight's I = fl(1 / fl(448 / amax))
    input_scale: torch.Tensor  # float32 scalar: the input's I


def fp8_codes(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to FP8 E4M3 codes the way fake quantization rounds it (float32 multiply, clamp, RNE cast)."""
    scale, _ = fp8_scale_pair(amax)
    return (x.detach().to(torch.float32) * scale.to(x.device)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_layer_tensors(module: nn.Module) -> Fp8Tensors:
    """The stored form of a calibrated per-tensor FP8 Linear (FP8_DEFAULT_CFG-style weight and input quantizers).

    Raises ``ValueError`` naming what is missing for any other layer (other formats, dynamic or block scales,
    a disabled or uncalibrated quantizer, a module that is not a Linear).
    """
    if not isinstance(module, nn.Linear):
        raise ValueError(f"is a {type(module).__name__}, not a Linear")
    wq: Any = getattr(module, "weight_quantizer", None)
    iq: Any = getattr(module, "input_quantizer", None)
    if not is_fp8_per_tensor(wq) or not is_fp8_per_tensor(iq):
        raise ValueError("has no calibrated static per-tensor FP8 weight and input quantizers")
    _, w_inv = fp8_scale_pair(wq.amax)
    _, x_inv = fp8_scale_pair(iq.amax)
    dev = module.weight.device
    return Fp8Tensors(fp8_codes(module.weight, wq.amax), w_inv.reshape(()).to(dev), x_inv.reshape(()).to(dev))
