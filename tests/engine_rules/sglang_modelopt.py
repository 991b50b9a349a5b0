"""SGLang 0.5.23's loader rules for a ModelOpt FP8 checkpoint of Qwen2.5-VL, where they differ from vLLM's.

Read from the sglang 0.5.23 wheel (github.com/sgl-project/sglang; PyPI wheel), paths under ``sglang/srt/``:
- config: ``model_loader/weight_utils.py`` ``get_quant_config`` (config.json ``quantization_config`` via
  ``checkpoint_quantization.py`` ``resolve_checkpoint_quant_spec``, else ``hf_quant_config.json``),
  ``layers/quantization/modelopt_quant.py`` ``ModelOptFp8Config.from_config``: the flat form is used when it has
  ``quant_algo``, which must be exactly ``"FP8"`` (case-sensitive, unlike vLLM); exclusions come from ``ignore``
  only (vLLM also reads ``exclude_modules``); FP8 KV cache from ``kv_cache_scheme`` {type float, num_bits 8} or
  ``kv_cache_quant_algo``. ``packed_modules_mapping`` is the model class's (``model_loader/loader.py``
  ``_get_quantization_config``): ``{"gate_up_proj": [gate_proj, up_proj]}`` for Qwen2.5-VL.
- exclusion names: ``ModelOptQuantConfig.apply_weight_name_mapper`` with ``Qwen2_5_VLForConditionalGeneration.
  hf_to_sglang_mapper`` (``models/utils.py`` ``WeightsMapper._map_name``: longest key first, first match only),
  plus each mapped name without its ``language_model.`` prefix.
- exclusion matching: ``ModelOptQuantConfig._get_quant_method``: ``layers/quantization/utils.py``
  ``is_layer_skipped`` (dotted-path match without wildcards, fused shards from the packed mapping or the fallback
  q/k/v, gate/up; some-but-not-all shards raise ValueError) or ``is_layer_excluded`` (glob turned into a regex,
  ``fullmatch`` on the whole prefix or on any dotted part). No vision fallback: ``visual`` must be excluded.
- module names (``models/qwen2_5_vl.py``, ``models/qwen2.py``, ``layers/attention/vision.py``): ``model.layers.N.
  self_attn.qkv_proj``, ``...o_proj``, ``...mlp.gate_up_proj``, ``...mlp.down_proj``, ``lm_head``; vision
  ``visual.blocks.N.attn.qkv_proj``, ``...attn.proj``, ``...mlp.gate_up_proj``, ``...mlp.down_proj``,
  ``visual.merger.mlp.0``/``.2``.
- tensor names: ``Qwen2_5_VLForConditionalGeneration.load_weights``: checkpoint names are used as stored (no
  prefix mapping); stacked ``.q_proj``/``.k_proj``/``.v_proj`` -> ``.qkv_proj`` and ``up_proj``/``gate_proj`` ->
  ``gate_up_proj`` (vision only gate/up), where a name missing from the parameters raises KeyError; every other
  name is loaded if it is a parameter and silently skipped if not (``attn.qkv.`` -> ``attn.qkv_proj.`` in vision).
- lm_head: with ``tie_word_embeddings`` the head *is* ``model.embed_tokens`` (no ParallelLMHead, never quantized,
  whatever the checkpoint stores); a stored ``lm_head.weight`` is copied into that shared tensor and
  ``lm_head.*_scale`` are skipped. Untied, ``ParallelLMHead`` takes the quant config.
"""

from __future__ import annotations

import re

from .loadcheck import Delivery, ShardId, Slot, add_module, check_deliveries
from .qwen2_5_vl import Dims, linears, plain_params, tie_word_embeddings
from .view import IGNORED, REFUSED, SILENT, ExportView, Linear, LoadPlan

ENGINE = "SGLang 0.5.23"

SUBSTR_MAP = {"attn.qkv": "attn.qkv_proj"}
PREFIX_MAP = {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
              "lm_head.": "language_model.lm_head.", "model.": "language_model.model."}
PACKED = {"gate_up_proj": ["gate_proj", "up_proj"]}
FALLBACK_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
FUSED_PATTERNS = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           ("gate_up_proj", "up_proj", 1), ("gate_up_proj", "gate_proj", 0))


class ShardMismatch(ValueError):
    """SGLang's ``Detected some but not all shards of ... are quantized``."""


def _map_name(name: str) -> str:
    for old in sorted(SUBSTR_MAP, key=len, reverse=True):
        if old in name:
            name = name.replace(old, SUBSTR_MAP[old], 1)
            break
    for old in sorted(PREFIX_MAP, key=len, reverse=True):
        if name.startswith(old):
            name = name.replace(old, PREFIX_MAP[old], 1)
            break
    return name


def map_exclusions(raw: list[str]) -> list[str]:
    out: list[str] = []
    for name in (_map_name(e) for e in raw):
        out.append(name)
        if name.startswith("language_model."):
            out.append(name.removeprefix("language_model."))
    return list(dict.fromkeys(out))


def _path_match(ignored: str, prefix: str) -> bool:
    ignored, prefix = ignored.rstrip("."), prefix.rstrip(".")
    return ignored == prefix or prefix.startswith(ignored + ".") or f".{ignored}." in f".{prefix}."


def is_layer_skipped(prefix: str, ignored: list[str]) -> bool:
    proj = prefix.split(".")[-1]
    fused = PACKED if proj in PACKED else FALLBACK_FUSED
    if proj in fused:
        verdicts = {any(_path_match(i, prefix.replace(proj, s)) for i in ignored) for s in fused[proj]}
        if len(verdicts) > 1:
            raise ShardMismatch(f"Detected some but not all shards of {prefix} are quantized")
        return verdicts.pop()
    skipped = any(_path_match(i, prefix) for i in ignored)
    halves = {prefix.replace("gate_up_proj", s) for s in ("gate_proj", "up_proj")}
    if "gate_up_proj" in prefix and halves <= set(ignored):
        skipped = True
    return skipped


def is_layer_excluded(prefix: str, ignored: list[str]) -> bool:
    prefixes = [prefix] + ([prefix.removeprefix("language_model.")] if prefix.startswith("language_model.") else [])
    for pattern in ignored:
        rx = re.compile(pattern.replace(".", r"\.").replace("*", r".*"))
        for p in prefixes:
            if rx.fullmatch(p) or any(rx.fullmatch(part) for part in p.split(".")):
                return True
        tail = pattern.rsplit(".", maxsplit=1)[-1]
        if tail in FUSED_PATTERNS and any(tail in p.rsplit(".", maxsplit=1)[-1] for p in prefixes):
            return True
    return False


def module_name(linear: Linear) -> str:
    return linear.path("qkv_proj" if linear.tower == "vision" and linear.fused == "qkv" else linear.fused)


def read_config(view: ExportView, plan: LoadPlan) -> tuple[list[str], bool] | None:
    found = view.quant_config(plan)
    if found is None:
        return None
    qc, source = found
    if qc.get("quant_algo") is not None:
        algo = qc["quant_algo"]
        scheme = qc.get("kv_cache_scheme")
        if isinstance(scheme, dict):
            kv = "FP8" if scheme.get("type") == "float" and scheme.get("num_bits") == 8 else None
        else:
            kv = qc.get("kv_cache_quant_algo")
        excl = qc.get("ignore")
    else:
        sec = qc.get("quantization") or {}
        algo, kv, excl = sec.get("quant_algo"), sec.get("kv_cache_quant_algo"), sec.get("exclude_modules")
    if algo != "FP8":
        plan.add("quant-algo", source, REFUSED, f"quant_algo {algo!r}: ModelOptFp8Config accepts exactly 'FP8'")
        return None
    return list(excl or []), kv == "FP8"


def route(name: str, slots: dict[str, Slot]) -> tuple[str, ShardId, str]:
    """(SGLang parameter, shard id, outcome): "load", "skip", "ignore" or "refuse" (KeyError)."""
    if "rotary_emb.inv_freq" in name:
        return name, None, "skip"
    for new, old, sid in STACKED:
        if old not in name or ("visual" in name and "up_proj" not in name and "gate_proj" not in name):
            continue
        name = name.replace(old, new)
        if name.endswith(".bias") and name not in slots:
            return name, sid, "ignore"
        return (name, sid, "load") if name in slots else (name, sid, "refuse")
    if "visual" in name:
        name = name.replace("attn.qkv.", "attn.qkv_proj.")
    return (name, None, "load") if name in slots else (name, None, "ignore")


def check(view: ExportView) -> LoadPlan:
    """What SGLang 0.5.23 makes of the export (see the module docstring for the rules followed)."""
    plan = LoadPlan(ENGINE)
    cfg = read_config(view, plan)
    if cfg is None:
        return plan
    raw, plan.kv_cache_fp8 = cfg
    plan.exclusions = excl = map_exclusions(raw)
    dims = Dims.of(view)
    plan.lm_head_tied = tied = tie_word_embeddings(view)
    slots: dict[str, Slot] = {}
    for linear in linears(dims):
        if linear.tower == "head" and tied:
            continue  # the head is model.embed_tokens
        name = module_name(linear)
        try:
            quantized = not (is_layer_skipped(name, excl) or is_layer_excluded(name, excl))
        except ShardMismatch as exc:
            plan.add("fused-shard-mismatch", name, REFUSED, f"{exc} (quantization/utils.py is_layer_skipped)")
            quantized = False
        add_module(plan, slots, name, linear, quantized)
    for legacy, shape in plain_params(dims).items():
        slots[legacy] = Slot(legacy, "weight", shape=shape)
    routed: dict[str, list[Delivery]] = {}
    for tname, meta in view.tensors.items():
        if tied and tname.startswith("lm_head."):
            if tname == "lm_head.weight":
                plan.add("tied-lm-head-dropped", tname, SILENT,
                         "tie_word_embeddings: SGLang's head is model.embed_tokens; this tensor is copied into the "
                         "shared embedding tensor (FP8 codes unscaled; the embedding's own load overwrites them if it "
                         "comes later) and lm_head scales are skipped: the stored head is never served")
            else:
                plan.add("ignored-tensor", tname, IGNORED, "the tied head has no such parameter; skipped")
            continue
        pname, shard, outcome = route(tname, slots)
        if outcome == "load":
            routed.setdefault(pname, []).append((tname, shard, meta))
        elif outcome == "ignore":
            plan.add("ignored-tensor", tname, IGNORED, f"no SGLang parameter {pname}; skipped without a word")
        elif outcome == "refuse":
            plan.add("unexpected-tensor", tname, REFUSED, f"KeyError: {pname} (stacked parameter missing)")
    check_deliveries(plan, slots, routed)
    return plan
