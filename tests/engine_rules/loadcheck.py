"""The checks both engines' loaders share once a tensor has been routed to a parameter.

An engine's rule set decides which Linears are FP8 and routes every stored tensor to the parameter its
loader would copy it into (or refuses/ignores it); :func:`check_deliveries` then applies what the
parameters accept. Sources (same in both engines, names differ):
- FP8 Linear parameters: ``weight`` float8_e4m3fn ``[sum(out), in]`` plus one float32 ``weight_scale`` and
  ``input_scale`` slot per shard, initialised to ``finfo(float32).min`` (vLLM 0.34.0
  ``layers/quantization/modelopt.py`` ``KFp8StaticTensor.create_weights``; SGLang 0.5.23
  ``modelopt_quant.py`` ``ModelOptFp8LinearMethod.create_weights``). A slot no tensor fills keeps that
  sentinel, and neither engine checks (vLLM tracks unloaded weights only for unquantized models,
  ``model_loader/default_loader.py`` ``load_weights``): the shard is dequantized with a huge negative scale
  or skipped by ``requantize_with_max_scale`` (``quantization/utils/w8a8_utils.py``) -- silent.
- A fused layer's per-shard scales are collapsed to their maximum and the weights requantized to it
  (``KFp8StaticTensor.process``; SGLang ``process_weights_after_loading``): recorded as ``requantized``.
- A scale loads from shape ``()`` or ``(1,)`` only (vLLM ``model_executor/parameter.py``
  ``_assert_and_load``/``_load_into_shard_id``: assertion otherwise).
- A weight copied into a parameter of another dtype is cast by ``copy_``: BF16 values into an FP8 parameter,
  or FP8 codes into a BF16 parameter without their scale -- silent.
- Weight shapes are asserted per shard (``param_data.shape == loaded_weight.shape``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .view import FLOATS, FP8, REFUSED, SILENT, Linear, LoadPlan, ModulePlan, TensorMeta, scale_shape_ok, unique

ShardId = str | int | None
Delivery = tuple[str, ShardId, TensorMeta]  # (stored tensor name, shard id the loader passes, header)


@dataclass(frozen=True)
class Slot:
    """A parameter the engine registers: on a Linear (``linear`` set) or a plain one (norm, embedding)."""

    module: str
    leaf: str
    linear: Linear | None = None
    quantized: bool = False
    shape: tuple[int, ...] | None = None  # plain parameters whose shape the loader asserts


def linear_slots(name: str, linear: Linear, quantized: bool) -> dict[str, Slot]:
    leaves = ["weight"] + (["bias"] if linear.bias else []) + (["weight_scale", "input_scale"] if quantized else [])
    return {f"{name}.{leaf}": Slot(name, leaf, linear, quantized) for leaf in leaves}


def check_deliveries(plan: LoadPlan, slots: dict[str, Slot], routed: dict[str, list[Delivery]]) -> None:
    """Findings for every parameter the stored tensors would leave empty, mis-typed or mis-shaped."""
    for pname, slot in slots.items():
        got = routed.get(pname, [])
        if slot.linear is None:
            _check_plain(plan, pname, slot, got)
        else:
            _check_linear_param(plan, pname, slot, got)
    for mod in plan.modules.values():
        if not mod.quantized or len(mod.sources) < 2:
            continue
        scales = [m.value for _, _, m in routed.get(f"{mod.name}.weight_scale", [])]
        inputs = [m.value for _, _, m in routed.get(f"{mod.name}.input_scale", [])]
        mod.requantized = unique(scales) > 1 or unique(inputs) > 1


def _check_plain(plan: LoadPlan, pname: str, slot: Slot, got: list[Delivery]) -> None:
    if not got:
        if slot.leaf != "kv-scale":  # KV-cache scales are optional (defaults, see the rule sets)
            plan.add("missing-weight", pname, SILENT, "no stored tensor fills this parameter; it stays uninitialised")
        return
    name, _, meta = got[0]
    if meta.dtype not in FLOATS:
        plan.add("fp8-into-bf16", name, SILENT,
                 f"stored {meta.dtype} into an unquantized parameter: FP8 codes are used without their scale")
    if slot.shape is not None and meta.shape != slot.shape:
        plan.add("shape", name, REFUSED, f"shape {meta.shape}, the engine's parameter is {slot.shape}")


def _check_linear_param(plan: LoadPlan, pname: str, slot: Slot, got: list[Delivery]) -> None:
    assert slot.linear is not None
    expected = [(leaf, sid, rows) for leaf, sid, rows in slot.linear.shards]
    by_shard = {sid: (name, meta) for name, sid, meta in got}
    for leaf, sid, rows in expected:
        source = slot.linear.path(leaf)
        if sid not in by_shard:
            rule = "missing-scale" if slot.leaf.endswith("_scale") else "missing-weight"
            plan.add(rule, f"{source}.{slot.leaf}", SILENT,
                     f"{slot.module} is {'FP8' if slot.quantized else 'unquantized'} in the engine; no stored "
                     f"{slot.leaf} for this shard, so its slot keeps the loader's initial value")
            continue
        name, meta = by_shard[sid]
        if slot.leaf == "weight":
            if slot.quantized and meta.dtype != FP8:
                plan.add("bf16-into-fp8", name, SILENT,
                         f"the engine builds {slot.module} FP8 but the export stores {meta.dtype}: cast to FP8 "
                         "unscaled, its scales never loaded")
            if not slot.quantized and meta.dtype not in FLOATS:
                plan.add("fp8-into-bf16", name, SILENT,
                         f"the engine builds {slot.module} unquantized but the export stores {meta.dtype}: FP8 "
                         "codes are used without their scale")
            if meta.shape != (rows, slot.linear.in_features):
                want = (rows, slot.linear.in_features)
                plan.add("shape", name, REFUSED, f"shape {meta.shape}, the engine expects {want}")
        elif slot.leaf.endswith("_scale"):
            if meta.dtype not in FLOATS:
                plan.add("scale-dtype", name, REFUSED, f"scale stored as {meta.dtype}")
            elif not scale_shape_ok(meta):
                plan.add("scale-shape", name, REFUSED, f"per-tensor scale of shape {meta.shape}; () or (1,) load")
            elif meta.value is not None and not (math.isfinite(meta.value) and meta.value > 0):
                plan.add("scale-value", name, SILENT, f"scale {meta.value} is not a positive finite number")


def add_module(plan: LoadPlan, slots: dict[str, Slot], name: str, linear: Linear, quantized: bool) -> None:
    plan.modules[name] = ModulePlan(name, linear.sources, quantized)
    slots.update(linear_slots(name, linear, quantized))
