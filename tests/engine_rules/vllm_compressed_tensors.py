"""vLLM 0.34.0's rules for a compressed-tensors FP8 (static, per-tensor) checkpoint of Qwen2.5-VL.

Same loader as the ModelOpt rules (``vllm_modelopt.plan_loading``: names, parameters, tied head, KV-cache
scales); what differs is how the config picks the FP8 Linears. Read from the vllm 0.34.0 wheel
(github.com/vllm-project/vllm, paths under ``vllm/model_executor/``) and compressed-tensors 0.17.0
(github.com/neuralmagic/compressed-tensors; the version vLLM 0.34.0 pins):
- config: ``transformers_utils/model_arch_config_convertor.py`` (quant_method ``compressed_tensors`` normalised to
  ``compressed-tensors``); ``layers/quantization/compressed_tensors/compressed_tensors.py``
  ``CompressedTensorsConfig.from_config`` (config groups whose only target ends in ``Attention`` dropped; ``ignore``;
  global ``format``; ``kv_cache_scheme``) and ``_quantization_scheme_map_from_config`` (per target: ``weights``,
  ``input_activations`` when the format is an activation format or the group has them, group ``format``).
  ``QuantizationArgs`` defaults (compressed-tensors ``quantization/quant_args.py``): num_bits 8, type int,
  symmetric, dynamic false, strategy tensor when no group_size (``validate_model_after``).
- names: ``apply_vllm_mapper`` maps targets and ignore entries that contain a dot and do not start with ``re:``
  through the model's rename mapper (the same prefix map as for ModelOpt); class names and regexes are kept.
- matching (``compressed_tensors/utils.py``): ``should_ignore_layer`` -> ``utils/config_utils.py``
  ``find_matching_patterns`` with ``use_fnmatch=False`` (exact name or ``re:`` regex with ``re.match``; no globs:
  ``visual*`` matches nothing), per shard for fused layers, some-but-not-all shards raise ValueError;
  ``find_matched_target``: exact/regex on the layer name, then all shards of a fused layer, then the class name
  contained in the target (``Linear`` matches ``QKVParallelLinear``, ``RowParallelLinear``, ...; not
  ``ParallelLMHead``, so an FP8 lm_head needs a name or regex target such as ``re:.*lm_head$``).
- scheme: ``_get_scheme_from_parts``: with an activation format (naive/int/float/nvfp4-pack-quantized) and
  ``_is_fp8_w8a8`` (float, symmetric, static weight of tensor/channel/block strategy; static symmetric per-tensor
  or dynamic input) -> ``CompressedTensorsW8A8Fp8`` (``schemes/compressed_tensors_w8a8_fp8.py``: ``weight``,
  ``weight_scale`` per partition, ``input_scale`` only when the input is static). Only static per-tensor W8A8 is
  modelled here; anything else is reported.
- ``get_quant_method``: ``ParallelLMHead`` is quantized only if ``get_scheme`` finds a target (ValueError -> not).
"""

from __future__ import annotations

import re
from typing import Any

from . import vllm_modelopt
from .view import REFUSED, ExportView, Linear, LoadPlan

ENGINE = "vLLM 0.34.0 (compressed-tensors)"

ACTIVATION_FORMATS = ("naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized")
# The vLLM class of each Qwen2.5-VL Linear, by its fused leaf (models/qwen2.py, models/qwen2_5_vl.py).
CLASS_OF = {"qkv_proj": "QKVParallelLinear", "qkv": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear",
            "o_proj": "RowParallelLinear", "down_proj": "RowParallelLinear", "proj": "RowParallelLinear",
            "0": "ColumnParallelLinear", "2": "RowParallelLinear", "lm_head": "ParallelLMHead"}


def quant_args(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fields of ``QuantizationArgs`` these rules use, with compressed-tensors' defaults."""
    if raw is None:
        return None
    strategy = raw.get("strategy")
    if strategy is None:
        gs = raw.get("group_size")
        strategy = "tensor" if gs is None else "group" if gs > 0 else "channel"
    return {"num_bits": raw.get("num_bits", 8), "type": raw.get("type", "int"), "symmetric": raw.get("symmetric", True),
            "dynamic": raw.get("dynamic", False), "strategy": strategy}


def _map_target(t: str) -> str:
    return vllm_modelopt.rename(t) if "." in t and not t.startswith("re:") else t


def _match(value: str, target: str, contains: bool = False) -> bool:
    """``is_equal_or_regex_match`` (use_fnmatch False)."""
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    if contains:
        return target.lower() in value.lower()
    return target == value


def should_ignore(name: str, ignore: list[str]) -> bool:
    matched = [p for p in ignore if _match(name, p)]
    if matched:
        return True
    proj = name.split(".")[-1]
    if proj not in vllm_modelopt.PACKED:
        return False
    per_shard = [any(_match(name.replace(proj, s), p) for p in ignore) for s in vllm_modelopt.PACKED[proj]]
    if any(per_shard) and not all(per_shard):
        raise vllm_modelopt.ShardMismatch(f"Found different quantization schemes for the shards of {name}")
    return all(per_shard)


def matched_target(name: str, cls: str, targets: list[str]) -> str | None:
    for t in targets:
        if _match(name, t):
            return t
    fused = next((k for k in vllm_modelopt.PACKED if name.endswith(k)), None)
    if fused is not None:
        hits = [next((t for t in targets if _match(name.replace(fused, u), t)), None)
                for u in vllm_modelopt.PACKED[fused]]
        if all(hits):
            return hits[0]
    return next((t for t in targets if _match(cls, t, contains=True)), None)


def is_static_tensor_fp8(weights: dict[str, Any], inputs: dict[str, Any] | None) -> bool:
    w_ok = (weights["type"] == "float" and weights["num_bits"] == 8 and weights["symmetric"]
            and not weights["dynamic"] and weights["strategy"] == "tensor")
    return bool(w_ok and inputs is not None and inputs["type"] == "float" and inputs["num_bits"] == 8
                and inputs["symmetric"] and not inputs["dynamic"] and inputs["strategy"] == "tensor")


def read_config(view: ExportView, plan: LoadPlan) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    """(target -> scheme, ignore list) in vLLM's names, or None with a finding."""
    qc = view.config.get("quantization_config") or view.text_config.get("quantization_config") \
        or view.config.get("compression_config")
    method = str((qc or {}).get("quant_method", "")).lower().replace("compressed_tensors", "compressed-tensors")
    if method != "compressed-tensors":
        plan.add("quant-method", "config.json", REFUSED, f"quant_method {method!r} is not compressed-tensors")
        return None
    assert qc is not None
    fmt = qc.get("format")
    schemes: dict[str, dict[str, Any]] = {}
    for gname, group in (qc.get("config_groups") or {}).items():
        targets = group.get("targets") or []
        if len(targets) == 1 and targets[0].endswith("Attention"):
            continue
        gfmt = group.get("format") or fmt
        inputs = group.get("input_activations")
        for t in targets:
            schemes[_map_target(t)] = {"group": gname, "format": gfmt, "weights": quant_args(group.get("weights")),
                                       "inputs": quant_args(inputs)}
    plan.kv_cache_fp8 = isinstance(qc.get("kv_cache_scheme"), dict) and qc["kv_cache_scheme"].get("type") == "float"
    return schemes, [_map_target(i) for i in qc.get("ignore", [])]


def check(view: ExportView) -> LoadPlan:
    """What vLLM 0.34.0 makes of a compressed-tensors export (see the module docstring)."""
    plan = LoadPlan(ENGINE)
    cfg = read_config(view, plan)
    if cfg is None:
        return plan
    schemes, ignore = cfg
    plan.exclusions = ignore
    targets = list(schemes)

    def decide(name: str, linear: Linear) -> bool:
        cls = CLASS_OF[linear.fused]
        try:
            if should_ignore(name, ignore):
                return False
        except vllm_modelopt.ShardMismatch:
            if cls == "ParallelLMHead":  # get_quant_method swallows get_scheme's ValueError for the head
                return False
            raise
        target = matched_target(name, cls, targets)
        if target is None or schemes[target]["weights"] is None:
            return False
        s = schemes[target]
        if s["format"] not in ACTIVATION_FORMATS or not is_static_tensor_fp8(s["weights"], s["inputs"]):
            plan.add("unmodelled-scheme", name, REFUSED,
                     f"target {target!r} of {s['group']} (format {s['format']!r}) is not static per-tensor FP8 W8A8, "
                     "the only scheme these rules model (CompressedTensorsW8A8Fp8 with a static input scale)")
            return False
        return True

    return vllm_modelopt.plan_loading(view, plan, decide)
