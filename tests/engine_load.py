"""What vLLM, SGLang and TensorRT-LLM hold after loading a ModelOpt FP8 export, emulated in PyTorch on CPU.

Test helper. It follows the engines' load rules for per-tensor FP8 Linears as read in their sources (read, not
copied; nothing of theirs is imported or run here):

- vLLM, ``vllm/model_executor/layers/quantization/modelopt.py`` (commit 00155cde),
  ``ModelOptFp8LinearMethod.process_weights_after_loading``: a fused layer (q/k/v -> ``qkv_proj``, gate/up ->
  ``gate_up_proj``) gets ``weight_scale.max()`` and ``input_scale.max()``; only when the shard weight scales are
  not all equal are the shards requantized, by ``requantize_with_max_scale``
  (``quantization/utils/w8a8_utils.py``, commit 646ad5a4): ``per_tensor_dequantize`` casts the FP8 shard to
  float16 and multiplies by the shard's scale, then ``ops.scaled_fp8_quant(weight_dq, max_w_scale)`` quantizes
  with the max scale. Activations: ``scaled_fp8_quant`` with the static input scale runs
  ``scaled_fp8_quant_kernel`` (``csrc/quantization/fp8/common.cu``): ``inverted_scale = 1.0f / *scale``, then
  ``x * inverted_scale`` clamped to +-448 and cast (``scaled_fp8_conversion<true>``); the torch path
  (``input_quant_fp8.py`` ``QuantFP8.forward_native``) multiplies by ``scale.reciprocal()`` alike.
- SGLang, ``python/sglang/srt/layers/quantization/modelopt_quant.py`` (commit faeb9685),
  ``ModelOptFp8LinearMethod.process_weights_after_loading``: always ``requantize_with_max_scale``
  (``srt/layers/quantization/utils/utils.py``, commit c5bef612: float16 dequantize, ``scaled_fp8_quant`` with
  the max scale), max input scale; sgl-kernel's ``per_tensor_quant_fp8_kernel`` quantizes with
  ``scale_val = 1.0f / (*scale)`` times ``x``.
- TensorRT-LLM, ``tensorrt_llm/_torch/modules/linear.py`` (commit ed53795b),
  ``FP8QDQLinearMethod.rescale_fused_weights``: max input scale, max weight scale, and every shard always
  rescaled as ``weight.to(module.dtype).mul_(original_scale).div_(max_scale).to(float8_e4m3fn)`` (bf16);
  activations by ``static_quantize_e4m3_per_tensor``, whose ``scaleMatrix<QUANTIZE=true>`` computes ``x / scale``.

Arithmetic details kept: on CUDA a float32 0-dim scale multiplying a float16 (bf16) tensor is loaded as the
tensor's dtype (TensorIterator's dynamic cast to the common dtype), so the emulation rounds the scale to float16
(bf16) before multiplying; FP8 casts round to nearest even after the +-448 clamp (``__NV_SATFINITE``).
The GEMM is emulated by the dequantize path (both operands dequantized to bf16, ``F.linear``), the way
``Fp8Linear`` runs on CPU; only the fused GEMM's accumulation order is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENGINES = ("vllm", "sglang", "trtllm")
FUSED_LEAVES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass
class ServedLinear:
    """One shard as an engine holds it after loading: its (maybe requantized) codes and the fused layer's scales."""

    weight: torch.Tensor  # float8_e4m3fn
    weight_scale: torch.Tensor  # float32 scalar (the fused layer's)
    input_scale: torch.Tensor  # float32 scalar (the fused layer's)
    activation: str  # "reciprocal" (x * fl(1/scale)) or "divide" (x / scale)
    requantized: bool


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _requant_vllm_sglang(code: torch.Tensor, scale: torch.Tensor, max_scale: torch.Tensor) -> torch.Tensor:
    """``per_tensor_dequantize`` (float16) then ``scaled_fp8_quant`` with the max scale (inverted, multiplied)."""
    dq = (code.to(torch.float16).float() * scale.to(torch.float16).float()).to(torch.float16)
    return _fp8(dq.float() * (1 / max_scale.float()))


def _requant_trtllm(code: torch.Tensor, scale: torch.Tensor, max_scale: torch.Tensor) -> torch.Tensor:
    """``weight.to(bf16).mul_(original_scale).div_(max_scale).to(fp8)``."""
    w = (code.to(torch.bfloat16).float() * scale.to(torch.bfloat16).float()).to(torch.bfloat16)
    w = (w.float() / max_scale.to(torch.bfloat16).float()).to(torch.bfloat16)
    return _fp8(w.float())


def _fused_groups(prefixes: list[str]) -> list[list[str]]:
    groups: dict[tuple[str, int], list[str]] = {}
    for p in prefixes:
        parent, _, leaf = p.rpartition(".")
        for i, leaves in enumerate(FUSED_LEAVES):
            if leaf in leaves:
                groups.setdefault((parent, i), []).append(p)
    singles = [[p] for p in prefixes if not any(p in g for g in groups.values())]
    return [sorted(g, key=lambda p: [leaf for ls in FUSED_LEAVES for leaf in ls].index(p.rpartition(".")[2]))
            for g in groups.values()] + singles


def engine_load(export_dir: str | Path, engine: str) -> dict[str, ServedLinear]:
    """Checkpoint prefix of every FP8 Linear -> what ``engine`` holds for it after loading ``export_dir``."""
    from safetensors.torch import load_file

    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {ENGINES}")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(export_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    prefixes = sorted(k.removesuffix(".weight") for k, v in tensors.items() if k.endswith(".weight") and v.dtype == FP8)
    out: dict[str, ServedLinear] = {}
    for group in _fused_groups(prefixes):
        w_scales = [tensors[f"{p}.weight_scale"].float().reshape(()) for p in group]
        i_scales = [tensors[f"{p}.input_scale"].float().reshape(()) for p in group]
        w_max, i_max = torch.stack(w_scales).max(), torch.stack(i_scales).max()
        fused = len(group) > 1
        equal = all(torch.equal(s, w_scales[0]) for s in w_scales)
        for p, s in zip(group, w_scales):
            code = tensors[f"{p}.weight"]
            if engine == "vllm":
                requant = fused and not equal  # vLLM skips requantization when all shard scales are equal
                new = _requant_vllm_sglang(code, s, w_max) if requant else code
            elif engine == "sglang":
                requant = True  # requantize_with_max_scale always runs for a serialized FP8 checkpoint
                new = _requant_vllm_sglang(code, s, w_max)
            else:
                requant = fused  # rescale_fused_weights runs for every fused layer
                new = _requant_trtllm(code, s, w_max) if requant else code
            out[p] = ServedLinear(new, w_max, i_max, "divide" if engine == "trtllm" else "reciprocal", requant)
    return out


class ServedFp8Linear(nn.Module):
    """A Linear run as the engine runs it, GEMM emulated by the dequantize path in bf16."""

    def __init__(self, served: ServedLinear, bias: torch.Tensor | None):
        super().__init__()
        self.served = served
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.served
        xf = x.float()
        xq = _fp8(xf * (1 / s.input_scale) if s.activation == "reciprocal" else xf / s.input_scale)
        xd = (xq.float() * s.input_scale).to(x.dtype)
        wd = (s.weight.float() * s.weight_scale).to(x.dtype)
        return F.linear(xd, wd, None if self.bias is None else self.bias.to(x.dtype))


def served_model(export_dir: str | Path, engine: str) -> nn.Module:
    """The exported language model with every FP8 Linear replaced by what ``engine`` serves."""
    from auto_quantize_model.inference.fp8_linear import load_exported_lm

    ex = load_exported_lm(export_dir, device="cpu")
    served = engine_load(export_dir, engine)
    for name in ex.fp8_layers:
        old = ex.model.get_submodule(name)
        ex.model.set_submodule(name, ServedFp8Linear(served[name], old.bias))
    return ex.model.eval()


def requantized_codes_changed(export_dir: str | Path, engine: str) -> int:
    """How many weight codes the engine's load changed (0: it serves the exported codes)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(export_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return sum(int((s.weight.view(torch.uint8) != tensors[f"{p}.weight"].view(torch.uint8)).sum())
               for p, s in engine_load(export_dir, engine).items())
