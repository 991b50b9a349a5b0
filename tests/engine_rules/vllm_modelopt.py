"""vLLM 0.34.0's loader rules for a ModelOpt FP8 checkpoint of Qwen2.5-VL, applied to an export's headers.

Read from the vllm 0.34.0 wheel (github.com/vllm-project/vllm; PyPI wheel, ``vllm/_version.py``: 0.34.0, commit
g62d4bc3c7), paths under ``vllm/model_executor/`` unless they start with ``config/`` or ``transformers_utils/``:
- config: ``transformers_utils/config.py`` ``get_config`` (config.json ``quantization_config`` first, else
  ``hf_quant_config.json``), ``transformers_utils/model_arch_config_convertor.py``
  ``_normalize_quantization_config`` (quant_method lower-cased), ``config/model.py`` ``_verify_quantization``
  (``ModelOptFp8Config.override_quantization_method``: quant_method starting ``modelopt`` with quant_algo FP8),
  ``layers/quantization/modelopt.py`` ``ModelOptQuantConfigBase.from_config`` (flat config.json form: ``quant_algo``
  upper-cased, ``ignore`` else ``exclude_modules``, ``kv_cache_scheme`` {type float, num_bits 8} = FP8; nested
  ``hf_quant_config.json`` form: ``quantization.{quant_algo, kv_cache_quant_algo, exclude_modules}``) and
  ``ModelOptFp8Config.__init__`` (algo in FP8 / FP8_PER_CHANNEL_PER_TOKEN / FP8_PB_WO; only per-tensor FP8 here).
- exclusion names: ``ModelOptQuantConfigBase.apply_vllm_mapper`` (``x*`` becomes ``x`` and ``x.*``, then the
  model's rename mapper), called from ``models/interfaces.py`` ``SupportsQuant._maybe_apply_model_mapping`` for
  ``Qwen2_5_VLForConditionalGeneration`` and again for its ``Qwen2ForCausalLM``; the rename mapper is
  ``WeightsMapper.get_rename_mapper`` (``models/utils.py``) of ``hf_to_vllm_mapper`` (``models/qwen2_5_vl.py``).
- exclusion matching: ``ModelOptQuantConfigBase.is_layer_excluded`` (exact match with fused shards via
  ``quantization/utils/quant_utils.py`` ``is_layer_skipped`` -- some-but-not-all shards raise ValueError --, then
  plain substring, then ``fnmatch``) and ``get_quant_method`` (its vision fallback names ``vision_tower``,
  ``vision_model``, ``vit_large_projector``: not Qwen2.5-VL's ``visual``). ``packed_modules_mapping`` of
  ``Qwen2_5_VLForConditionalGeneration`` (qkv_proj, gate_up_proj, qkv) and ``Qwen2ForCausalLM``.
- tensor names: ``models/utils.py`` ``AutoWeightsLoader.load_weights`` (merged mapper: the model's
  ``hf_to_vllm_mapper`` + ``base_config.py`` ``get_cache_scale_mapper`` regexes + ``.g_idx`` drop + rotary drop;
  unexpected names raise ``There is no module or parameter named ...`` unless they end in ``.bias``,
  ``.q_scale``/``.k_scale``/``.v_scale`` or zero points), children's ``load_weights``: ``Qwen2Model`` stacked
  ``.q_proj``/``.k_proj``/``.v_proj`` -> ``.qkv_proj`` (q/k/v) and ``.gate_proj``/``.up_proj`` -> ``.gate_up_proj``
  (0/1); ``Qwen2_5_VisionTransformer`` stacked ``.mlp.gate_proj.``/``.mlp.up_proj.`` (``models/qwen2_5_vl.py``).
- lm_head: ``models/qwen2.py`` ``Qwen2ForCausalLM`` (ParallelLMHead built with the quant config, tied to the
  embedding when ``tie_word_embeddings``); ``config/vllm.py`` copies the top-level ``tie_word_embeddings`` into the
  text config of multimodal models; ``config/model.py`` ``maybe_untie_word_embeddings`` builds the head untied
  when the checkpoint stores ``lm_head.weight`` (vLLM PR #51665, not in 0.23.0); ``layers/quantization/modelopt.py``
  quantizes ``ParallelLMHead`` since 0.23.0 (0.22.0 only ``LinearBase``).
- KV cache: every attention layer gets ``q/k/v/prob_scale`` (``layers/quantization/kv_cache.py``
  ``BaseKVCacheMethod``); a missing scale keeps -1.0 and the cache falls back to scale 1.0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import fnmatch

from .loadcheck import Delivery, ShardId, Slot, add_module, check_deliveries
from .qwen2_5_vl import Dims, linears, plain_params, tie_word_embeddings
from .view import IGNORED, REFUSED, SILENT, ExportView, Linear, LoadPlan

ENGINE = "vLLM 0.34.0"

# models/qwen2_5_vl.py Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix, in order; each
# matching entry is applied in turn (WeightsMapper._map_name_with_shard loops without break).
PREFIX_MAP = (("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
              ("lm_head.", "language_model.lm_head."), ("model.", "language_model.model."))
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"], "qkv": ["qkv"]}
# models/qwen2.py Qwen2Model.hf_to_vllm_mapper.orig_to_new_stacked; models/qwen2_5_vl.py
# Qwen2_5_VisionTransformer.hf_to_vllm_mapper.orig_to_new_stacked.
LM_STACKED = ((".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
              (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1))
VISION_STACKED = ((".attn.q.", ".attn.qkv.", "q"), (".attn.k.", ".attn.qkv.", "k"), (".attn.v.", ".attn.qkv.", "v"),
                  (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0), (".mlp.up_proj.", ".mlp.gate_up_proj.", 1))
# layers/quantization/base_config.py get_cache_scale_mapper (the regexes that can match a Qwen2 checkpoint).
CACHE_SCALE_REGEX = ((re.compile(r"\.kv_scale$"), r".attn.k_scale"),
                     (re.compile(r"\.self_attn\.[kv]_proj\.([kv])_scale$"), r".self_attn.attn.\1_scale"),
                     (re.compile(r"\.self_attn\.qk(?:qk)?v_proj\.([kv])_scale$"), r".self_attn.attn.\1_scale"),
                     (re.compile(r"(?<!\.attn)\.([qkv])_scale$"), r".attn.\1_scale"),
                     (re.compile(r"(?<!\.attn)\.([qkv])_zero_point$"), r".attn.\1_zero_point"))
IGNORE_UNEXPECTED = (".bias", ".q_scale", ".k_scale", ".v_scale", ".q_zero_point", ".k_zero_point", ".v_zero_point")
VISION_FALLBACK = ("vision_tower", "vision_model", "vit_large_projector")
MODELOPT_FP8_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO")


class ShardMismatch(ValueError):
    """vLLM's ``Detected some but not all shards of ... are quantized``."""


def rename(name: str) -> str:
    for prefix, new in PREFIX_MAP:
        if name.startswith(prefix):
            name = name.replace(prefix, new, 1)
    return name


def map_exclusions(raw: list[str]) -> list[str]:
    """``apply_vllm_mapper`` as called twice at model construction (top-level model, then its language model)."""
    out = list(raw)
    for _ in range(2):
        expanded = []
        for e in out:
            if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
                expanded += [e[:-1], e[:-1] + ".*"]
            else:
                expanded.append(e)
        out = [rename(e) for e in expanded]
    return out


def _skipped_exact(prefix: str, ignored: list[str]) -> bool:
    """``is_layer_skipped`` with match_mode "exact" and the model's packed modules."""
    proj = prefix.split(".")[-1]
    if proj in PACKED and prefix in ignored:
        return True
    if proj in PACKED:
        verdicts = {prefix.replace(proj, shard) in ignored for shard in PACKED[proj]}
        if len(verdicts) > 1:
            raise ShardMismatch(f"Detected some but not all shards of {prefix} are quantized")
        return verdicts.pop()
    return prefix in ignored


def is_layer_excluded(prefix: str, ignored: list[str]) -> bool:
    if not ignored:
        return False
    if _skipped_exact(prefix, ignored):
        return True
    for e in ignored:
        if e != prefix and (e in prefix or (prefix.startswith("language_model.")
                                            and e in prefix.removeprefix("language_model."))):
            return True
    return any(fnmatch(prefix, e) for e in ignored)


def module_name(linear: Linear) -> str:
    """The module's prefix in vLLM (``lm_head`` lives at ``language_model.lm_head``: the rename is of tensor
    names, so it is applied to the name with a trailing dot)."""
    return rename(linear.path(linear.fused) + ".")[:-1]


def read_config(view: ExportView, plan: LoadPlan) -> tuple[list[str], bool] | None:
    """(exclusions as stored, FP8 KV cache) from the config vLLM reads, or None with a finding."""
    found = view.quant_config(plan)
    if found is None:
        return None
    qc, source = found
    nested = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else None
    method = str(qc.get("quant_method", "")).lower()
    if nested is not None and qc.get("producer", {}).get("name") == "modelopt":
        method = "modelopt"  # _normalize_quantization_config sets it for ModelOpt's nested form
    if not method.startswith("modelopt"):
        plan.add("quant-method", source, REFUSED, f"quant_method {method!r} is not ModelOpt's")
        return None
    sec = nested if nested is not None else qc
    algo = str(sec.get("quant_algo") or "").upper()
    if algo != "FP8":
        effect = REFUSED if algo not in MODELOPT_FP8_ALGOS else SILENT
        plan.add("quant-algo", source, effect, f"quant_algo {algo!r}: these rules model per-tensor FP8 ('FP8')")
        return None
    if nested is not None:
        excl, kv = nested.get("exclude_modules", []), nested.get("kv_cache_quant_algo")
    else:
        excl = qc.get("ignore", qc.get("exclude_modules", []))
        scheme = qc.get("kv_cache_scheme")
        fp8_kv = isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8
        kv = "FP8" if fp8_kv else None
    if not isinstance(excl, list):
        plan.add("exclusions-type", source, REFUSED, f"exclude_modules must be a list, got {type(excl).__name__}")
        return None
    return excl, str(kv or "").upper() == "FP8"


def route(name: str, slots: dict[str, Slot], tied: bool) -> tuple[str | None, ShardId, str]:
    """(vLLM parameter, shard id, outcome) for one stored tensor; outcome "load", "skip", "ignore" or "refuse"."""
    for regex, new in CACHE_SCALE_REGEX:
        if regex.search(name):
            name = regex.sub(new, name)
    if "rotary_emb.inv_freq" in name or "rotary_pos_emb.inv_freq" in name or name.endswith(".g_idx"):
        return None, None, "skip"
    name = rename(name)
    head, _, rest = name.partition(".")
    shard: ShardId = None
    if head == "language_model" and rest.startswith("model."):
        for old, new, sid in LM_STACKED:
            if old in rest:
                rest, shard = rest.replace(old, new, 1), sid
        name = f"language_model.{rest}"
    elif head == "visual":
        for old, new, sid in VISION_STACKED:
            if old in name:
                name, shard = name.replace(old, new, 1), sid
    if tied and name == "language_model.lm_head.weight":
        return name, shard, "skip"  # AutoWeightsLoader._can_skip: the head aliases the embedding
    if name in slots:
        return name, shard, "load"
    if name.endswith(IGNORE_UNEXPECTED):
        return name, shard, "ignore"
    return name, shard, "refuse"


def check(view: ExportView) -> LoadPlan:
    """What vLLM 0.34.0 makes of the export (see the module docstring for the rules followed)."""
    plan = LoadPlan(ENGINE)
    cfg = read_config(view, plan)
    if cfg is None:
        return plan
    raw, plan.kv_cache_fp8 = cfg
    plan.exclusions = excl = map_exclusions(raw)

    def decide(name: str, linear: Linear) -> bool:
        return not is_layer_excluded(name, excl) and not any(v in name for v in VISION_FALLBACK)

    return plan_loading(view, plan, decide)


def plan_loading(view: ExportView, plan: LoadPlan, decide: Callable[[str, Linear], bool]) -> LoadPlan:
    """The part of vLLM's load that does not depend on the quantization format: which Linears exist, where
    each stored tensor goes, and what the parameters accept. ``decide(module name, linear)`` says whether the
    format's config builds that Linear FP8 (raising :class:`ShardMismatch` where vLLM raises)."""
    dims = Dims.of(view)
    tied = tie_word_embeddings(view) and not any(n.endswith("lm_head.weight") for n in view.tensors)
    plan.lm_head_tied = tied
    slots: dict[str, Slot] = {}
    for linear in linears(dims):
        name = module_name(linear)
        try:
            quantized = decide(name, linear)
        except ShardMismatch as exc:
            plan.add("fused-shard-mismatch", name, REFUSED, f"{exc} (vLLM raises while building the model)")
            quantized = False
        if linear.tower == "head" and tied:
            if quantized:
                plan.add("tied-lm-head-quantized", name, SILENT,
                         "lm_head is tied to the BF16 embedding but not excluded: vLLM builds it FP8 and ties the "
                         "BF16 embedding into it; its scales are never loaded")
            continue
        add_module(plan, slots, name, linear, quantized)
    for legacy, shape in plain_params(dims).items():
        slots[rename(legacy)] = Slot(rename(legacy), "weight", shape=shape)
    for i in range(dims.layers):
        for s in ("q", "k", "v", "prob"):
            p = f"language_model.model.layers.{i}.self_attn.attn.{s}_scale"
            slots[p] = Slot(p, "kv-scale")
    routed: dict[str, list[Delivery]] = {}
    for tname, meta in view.tensors.items():
        pname, shard, outcome = route(tname, slots, tied)
        if outcome == "load" and pname is not None:
            routed.setdefault(pname, []).append((tname, shard, meta))
        elif outcome == "ignore":
            plan.add("ignored-tensor", tname, IGNORED, f"maps to {pname}, which vLLM has no parameter for; skipped")
        elif outcome == "refuse":
            plan.add("unexpected-tensor", tname, REFUSED,
                     f"maps to {pname}: 'There is no module or parameter named ...' (AutoWeightsLoader)")
    check_deliveries(plan, slots, routed)
    if plan.kv_cache_fp8:
        for i in range(dims.layers):
            for s in ("k", "v"):
                if f"language_model.model.layers.{i}.self_attn.attn.{s}_scale" not in routed:
                    plan.add("missing-kv-scale", f"model.layers.{i}.self_attn.{s}_proj.{s}_scale", SILENT,
                             "FP8 KV cache without this scale: vLLM uses 1.0")
    return plan
