"""Served semantics: the FP8 scales engines load, applied right after ModelOpt calibrates each format.

Engines run q/k/v of one attention block as one GEMM (``qkv_proj``) and gate/up of one MLP as one
(``gate_up_proj``), in the language model and in Qwen2.5-VL's vision blocks alike (vLLM's
``Qwen2_5_VisionMLP.gate_up_proj``; the vision ``attn.qkv`` is already one Linear). A fused GEMM has one
weight scale and one input scale: vLLM (``ModelOptFp8LinearMethod.process_weights_after_loading`` in
``model_executor/layers/quantization/modelopt.py``), SGLang (the same method in
``srt/layers/quantization/modelopt_quant.py``) and TensorRT-LLM (``FP8QDQLinearMethod.rescale_fused_weights``
in ``tensorrt_llm/_torch/modules/linear.py``) take the group's largest weight scale and largest input scale
and requantize the shards' weights to the shared weight scale. ModelOpt's exporter leaves that to them for
per-tensor FP8 (``_fuse_shared_input_modules`` skips FP8 groups). A search that calibrates separate scales
therefore scores, evaluates and exports a model no engine serves.

``fused_scales = "shared"`` (the default) gives every fused group one weight amax and one input amax (the
group's max) as soon as a format is calibrated, inside ModelOpt's search, so scores, the search cache, the
restore artifact, every evaluation, ``--measure`` and the export all hold what an engine holds after loading:
the engines' requantization then has nothing to change (vLLM skips it when the shard scales are equal).
``"separate"`` keeps ModelOpt's own per-layer scales, for engines that do not fuse. Only enabled, static,
per-tensor amax quantizers without a pre-quant scale are unified (FP8 and any other per-tensor format);
block, per-channel, dynamic and smoothed quantizers keep their own.

Exact reciprocals. Fake quantization multiplies by ``S = fl(448 / amax)`` and dequantizes with
``I = fl(1 / S)`` (float32; ``tensor_quant.py`` ``_fp8_eager`` and ``tensor_quant_gpu_fp8.cu``). A checkpoint
stores only ``I``; vLLM and SGLang quantize activations with ``fl(1 / I)`` (vLLM's ``scaled_fp8_quant_kernel``
and SGLang's ``per_tensor_quant_fp8_kernel`` invert the scale, then multiply; vLLM's ``QuantFP8.forward_native`` uses
``scale.reciprocal()``), which is ``S`` for about 85 % of float32 values only. Every FP8 per-tensor amax is
therefore stored in float32 and moved up by the fewest float32 ulps (0 for most, a handful at most: a
relative change of order 1e-6) that make ``fl(1 / fl(1 / S)) == S``: then the served activation codes are the
evaluated ones exactly. ModelOpt's zero-amax rule (amax <= 2^-24 means scale 448) is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from auto_quantize_model.autoquant.identity import FP8_SCALE_RULE
from auto_quantize_model.configs.scheme import FUSED_SCALES_MODES

log = logging.getLogger(__name__)

# Sibling Linears that engines run as one GEMM (the same leaves ModelOpt's AutoQuantize groups into one decision).
FUSED_LEAVES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FP8_DTYPE = torch.float8_e4m3fn  # the one FP8 format of this project: weights, activations, exports
FP8_MAX = 448.0  # its largest finite value
FP8_BITS = (4, 3)
# ModelOpt's fake quant treats amax <= 2^-24 as "all zeros" and uses scale 448 (tensor_quant.py, _fp8_eager).
ZERO_AMAX = 1.0 / (1 << 24)
_MAX_NUDGE_STEPS = 1000
_PATCH_LOCK = threading.RLock()


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Names of the Linears engines fuse, one tuple per group (q/k/v, gate/up siblings), in module order."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        for i, leaves in enumerate(FUSED_LEAVES):
            if leaf in leaves:
                groups.setdefault((parent, i), []).append(name)
    return [tuple(v) for v in groups.values() if len(v) > 1]


def per_tensor_quantizer(q: Any) -> bool:
    """An enabled, static, per-tensor amax quantizer without a pre-quant scale (the kind a fused GEMM shares)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    if not isinstance(q, TensorQuantizer) or not q.is_enabled or getattr(q, "_dynamic", False):
        return False
    if q.block_sizes or getattr(q, "pre_quant_scale", None) is not None:
        return False
    amax = q.amax
    return amax is not None and amax.numel() == 1


def _bits(q: Any) -> Any:
    bits = q.num_bits
    return tuple(bits) if isinstance(bits, list | tuple) else bits


def is_fp8_per_tensor(q: Any) -> bool:
    """A per-tensor FP8 E4M3 quantizer (FP8_DEFAULT_CFG's weight and input quantizers)."""
    return per_tensor_quantizer(q) and _bits(q) == FP8_BITS


def fp8_scale_pair(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, I) as ModelOpt's eager fake quantization computes them (``_fp8_eager``, the CPU path): ``448.0 / amax`` is
    torch's ``amax.reciprocal() * 448`` (``Tensor.__rdiv__``), so S = fl32(448 * fl32(1 / amax)) (zero amax: 448),
    I = fl32(1 / S). Exact-reciprocal amaxes (:func:`exact_reciprocal_amax`) give the same S on the GPU path."""
    scale = FP8_MAX / _safe_amax(amax)
    return scale, 1 / scale


def _kernel_scale(amax: torch.Tensor) -> torch.Tensor:
    """S as ModelOpt's CUDA extension computes it (``tensor_quant_gpu_fp8.cu`` ``fake_e4m3fy``: ``448.f / amax`` in
    C++, which ``ATen/TensorOperators.h`` makes ``empty_like(amax).fill_(448).div_(amax)``, a true division),
    reproduced on the host: fl32(448 / amax)."""
    safe = _safe_amax(amax)
    return torch.full_like(safe, FP8_MAX) / safe  # tensor / tensor: a true division, unlike float / tensor


def _safe_amax(amax: torch.Tensor) -> torch.Tensor:
    """The amax in float32 with ModelOpt's zero-amax rule applied (amax <= 2^-24 counts as 1, so S = 448)."""
    a = amax.detach().to(torch.float32)
    return torch.where(a <= ZERO_AMAX, torch.ones_like(a), a)


def exact_reciprocal_amax(amax: torch.Tensor) -> torch.Tensor:
    """The smallest float32 amax >= ``amax`` whose fake-quant scale S is the same on ModelOpt's CPU path and its GPU
    path (reciprocal-then-multiply and true division round differently for about a quarter of float32 amaxes) and
    survives the engines' round trip fl(1 / fl(1 / S)) == S (a zero amax is returned as is)."""
    # On the host: a few scalar steps, no device syncs; CPU and CUDA float32 division and reciprocal both round
    # correctly, so the host reproduces either device's S.
    a = amax.detach().to("cpu", torch.float32).clone()
    up = torch.full_like(a, float("inf"))
    for _ in range(_MAX_NUDGE_STEPS):
        if bool((a <= ZERO_AMAX).all()):
            return a
        scale, inv = fp8_scale_pair(a)
        if torch.equal(1 / inv, scale) and torch.equal(_kernel_scale(a), scale):
            return a
        a = torch.nextafter(a, up)
    raise RuntimeError(f"no float32 amax within {_MAX_NUDGE_STEPS} ulps above {float(amax)} has an exact reciprocal")


def _set_amax(q: Any, value: torch.Tensor) -> None:
    """Replace the quantizer's amax buffer (dtype included: a bf16 buffer would round a float32 amax away)."""
    device = q.amax.device
    shape = q.amax.shape
    if hasattr(q, "_amax"):
        delattr(q, "_amax")
    q.amax = value.to(device=device, dtype=torch.float32).reshape(shape)


def unify_fused_scales(model: nn.Module) -> list[tuple[str, ...]]:
    """Give each fused group one weight amax and one input amax (the group's max); returns the groups changed."""
    changed = []
    for group in fused_groups(model):
        mods = [model.get_submodule(n) for n in group]
        touched = False
        for attr in ("weight_quantizer", "input_quantizer"):
            qs: list[Any] = [getattr(m, attr, None) for m in mods]
            if not all(per_tensor_quantizer(q) for q in qs) or len({_bits(q) for q in qs}) != 1:
                continue
            top = torch.stack([q.amax.detach().to(torch.float32).reshape(()) for q in qs]).max()
            for q in qs:
                _set_amax(q, top)
            touched = True
        if touched:
            changed.append(group)
    return changed


def exact_reciprocal_fp8(model: nn.Module) -> int:
    """Store every FP8 per-tensor amax in float32, nudged to an exact-reciprocal scale; returns how many moved."""
    moved = 0
    for mod in model.modules():
        for attr in ("weight_quantizer", "input_quantizer"):
            q: Any = getattr(mod, attr, None)
            if not is_fp8_per_tensor(q):
                continue
            current = q.amax.detach().to("cpu", torch.float32)
            new = exact_reciprocal_amax(current)
            if q.amax.dtype != torch.float32 or not torch.equal(new, current):
                moved += int(not torch.equal(new, current))
                _set_amax(q, new)
    return moved


def apply_serving_semantics(model: nn.Module, fused_scales: str) -> dict[str, int]:
    """What an engine will hold, applied to a just-calibrated model: shared fused scales (unless ``separate``),
    then exact-reciprocal FP8 scales. Returns counts for the log."""
    groups = unify_fused_scales(model) if fused_scales == "shared" else []
    moved = exact_reciprocal_fp8(model)
    log.debug("serving semantics (%s): %d fused groups share scales, %d FP8 amaxes nudged to exact reciprocals",
              fused_scales, len(groups), moved)
    return {"fused_groups": len(groups), "nudged_amax": moved}


@contextlib.contextmanager
def serving_calibration(fused_scales: str) -> Iterator[None]:
    """While active, every ModelOpt calibration (``model_quant.calibrate``, which ``auto_quantize``'s
    ``before_search`` imports at call time and ``mtq.quantize`` calls by its module name) ends with
    :func:`apply_serving_semantics`, before ModelOpt saves the calibrated state. Restored on exit, errors too."""
    from modelopt.torch.quantization import model_quant

    if fused_scales not in FUSED_SCALES_MODES:
        raise ValueError(f"fused_scales {fused_scales!r} is not one of {FUSED_SCALES_MODES}")
    # The patch is process-wide: one search calibrates at a time, so two threads cannot swap each other's wrapper.
    with _PATCH_LOCK:
        original = model_quant.calibrate

        def calibrate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            out = original(model, *args, **kwargs)
            apply_serving_semantics(model, fused_scales)
            return out

        model_quant.calibrate = calibrate
        try:
            yield
        finally:
            model_quant.calibrate = original


def serving_summary(model: nn.Module, fused_scales: str) -> dict[str, Any]:
    """The manifest's ``serving`` section: the mode, the fused groups and whether each group's live FP8 scales
    are shared (read from the model, not assumed)."""
    groups = []
    for group in fused_groups(model):
        mods = [model.get_submodule(n) for n in group]
        shared = {}
        for attr in ("weight_quantizer", "input_quantizer"):
            members: list[Any] = [getattr(m, attr, None) for m in mods]
            if all(per_tensor_quantizer(q) for q in members):
                shared[attr.split("_")[0]] = len({float(q.amax.float()) for q in members}) == 1
        groups.append({"modules": list(group), "shared": shared})
    return {
        "fused_scales": fused_scales,
        "rule": "q/k/v and gate/up siblings are one GEMM in vLLM, SGLang and TensorRT-LLM: one weight scale and one "
                "input scale each (the group's max)",
        "exact_reciprocal_fp8_scales": True,
        "fp8_scale_rule": FP8_SCALE_RULE,
        "fused_groups": groups,
    }
