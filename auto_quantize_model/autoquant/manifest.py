"""The run manifest: the one place its fields are built, written and validated.

Schema (versioned; see docs/manifest.md). The driver, the sweep and the analysis all go through
:func:`build_manifest` and :func:`load_manifest`, so they cannot disagree about a field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from auto_quantize_model.autoquant.layers import (
    UNQUANTIZED,
    block_index,
    is_quantized_label,
    layer_kind,
    layer_tower,
    linear_layers,
    live_layer_formats,
    unquantized_label,
)
from auto_quantize_model.autoquant.solve import manifest_section
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_json
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.path_names import check_path_name, path_inside
from auto_quantize_model.provenance import git_revision, versions

# 2: a layer left unquantized is labelled by the run's dtype (bf16, fp16, fp32), no longer always "bf16".
SCHEMA_VERSION = 2
# Older versions this tool still reads (upgraded in memory by upgrade_manifest).
READABLE_VERSIONS = (1, SCHEMA_VERSION)
MANIFEST_SUFFIX = "_quant_manifest.json"
# Written beside a manifest by the sweep or the demo: evaluation metrics that the tables pick up.
EVALUATION_FILE = "evaluation.json"
NO_QUANT = "NONE"
KINDS_ALWAYS = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}
COUNTED_OVER = {
    Scope.LANGUAGE_MODEL: "language-model Linear weights (decoder blocks and lm_head); vision tower excluded",
    Scope.WHOLE_VLM: "every searched Linear weight of the whole VLM: vision blocks, merger, language model "
    "and lm_head",
}

REQUIRED_KEYS = {
    "schema_version": int,
    "scheme": dict,
    "model": dict,
    "calibration": dict,
    "effective_bits": dict,
    "budget_met": bool,
    "num_quantized_layers": int,
    "layers": dict,
    "layer_sensitivity": dict,
    "autoquant_state": dict,
    "timings": dict,
    "versions": dict,
}
SCORED_NEVER_QUANTIZED = ("scored, never quantized (unless its score is exactly 0): cost-excluded but searched (cost "
                          "weight 0, so no choice saves budget)")
LAYER_KEYS = ("dtype", "format", "search_group", "block_index", "kind", "num_params")
GROUP_KEYS = ("candidate_formats", "scores", "costs", "chosen_format", "module_names")


def manifest_path(output_dir: str | Path, scheme_name: str) -> Path:
    """``<output-dir>/<scheme>_quant_manifest.json`` (the name checked, the path kept inside ``output_dir``)."""
    check_path_name(scheme_name, "scheme name", "rename the scheme")
    return path_inside(output_dir, Path(output_dir) / f"{scheme_name}{MANIFEST_SUFFIX}", "manifest")


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def recipe_namer(format_names: dict[str, str]):
    """Map a ModelOpt QuantRecipe to our format name via its checkpoint signature."""

    def name(recipe: Any) -> str:
        sig = getattr(recipe, "checkpoint_signature", None)
        if sig in format_names:
            return format_names[sig]
        text = str(recipe)
        return NO_QUANT if text.startswith(NO_QUANT) else text

    return name


def sensitivity_table(search_state: dict[str, Any], format_names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per search group: candidate formats (most aggressive first), scores, costs and the choice."""
    name = recipe_namer(format_names)
    best = search_state["best"]["recipe"]
    out = {}
    for key, stats in search_state["candidate_stats"].items():
        group = key.removesuffix(".quant_recipe")
        modules = list(stats["module_names"])
        out[group] = {
            "candidate_formats": [name(f) for f in stats["formats"]],
            "scores": [_finite(s) for s in stats["scores"]],
            "costs": [float(c) for c in stats["costs"]],
            "uncompressed_cost": float(stats.get("uncompressed_cost", max(stats["costs"]))),
            "chosen_format": name(best[key]) if key in best else None,
            # 0 = searched but outside the effective-bits budget (cost-excluded layers).
            "cost_weight": float(stats.get("cost_weight", 1.0)),
            "module_names": modules,
            "block_index": block_index(modules[0]),
            "kinds": [layer_kind(m) for m in modules],
            "tower": layer_tower(modules[0]),
        }
    return out


def layer_table(model: nn.Module, groups: dict[str, dict[str, Any]], format_bits: dict[str, float],
                unquantized: str) -> dict[str, dict[str, Any]]:
    """Per LM Linear: dtype read from its live quantizers (``unquantized``, the run's dtype label, where they are
    off), plus its group, block, kind and size."""
    group_of = {m: g for g, info in groups.items() for m in info["module_names"]}
    live = live_layer_formats(model)
    layers = linear_layers(model)
    out = {}
    for lname, fmt in live.items():
        group = group_of.get(lname)
        chosen = groups[group]["chosen_format"] if group else None
        out[lname] = {
            "dtype": unquantized if fmt["weight"] == UNQUANTIZED else fmt["weight"],
            "input_dtype": unquantized if fmt["input"] == UNQUANTIZED else fmt["input"],
            "format": chosen if fmt["weight"] != UNQUANTIZED else NO_QUANT,
            "search_group": group,
            "block_index": block_index(lname),
            "kind": layer_kind(lname),
            "tower": layer_tower(lname),
            "num_params": int(layers[lname].weight.numel()),
            "bits": 16.0 if fmt["weight"] == UNQUANTIZED else (format_bits.get(chosen, 16.0) if chosen else 16.0),
        }
    return out


def tower_summary(layers: dict[str, dict[str, Any]], groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per tower (vision, merger, language): layers, quantized layers, weights, and summed scores."""
    out: dict[str, dict[str, Any]] = {}
    for lay in layers.values():
        t = out.setdefault(lay["tower"], {"layers": 0, "quantized_layers": 0, "params": 0, "quantized_params": 0,
                                          "summed_score": 0.0, "groups": 0})
        t["layers"] += 1
        t["params"] += lay["num_params"]
        if is_quantized_label(lay["dtype"]):
            t["quantized_layers"] += 1
            t["quantized_params"] += lay["num_params"]
    for info in groups.values():
        tower = out.get(info["tower"])
        if tower is not None:
            tower["groups"] += 1
            tower["summed_score"] += max((s for s in info["scores"] if s is not None), default=0.0)
    return out


def measured_effective_bits(layers: dict[str, dict[str, Any]], budget_only: bool = True) -> float:
    """Weight-averaged bits of the live model (independent of the solver's own figure).

    ``budget_only``: over the layers the budget counts (as the solver does); else over every layer.
    """
    chosen = [lay for lay in layers.values() if lay.get("in_budget", True) or not budget_only]
    total = sum(lay["num_params"] for lay in chosen)
    return sum(lay["num_params"] * lay["bits"] for lay in chosen) / total if total else 16.0


def exclusion_table(layers: dict[str, dict[str, Any]], search_setup: Any) -> dict[str, Any]:
    """The scheme's exclusion patterns, and each excluded layer with the pattern that excluded it."""
    from auto_quantize_model.configs.exclusions import matching_pattern

    out: dict[str, Any] = {"disabled_layers": [], "cost_excluded_layers": [], "layers": {}}
    if search_setup is None:
        return out
    out.update(search_setup.to_dict())
    for lname, lay in layers.items():
        search = matching_pattern(lname, search_setup.disabled)
        budget = matching_pattern(lname, search_setup.cost_excluded)
        lay["excluded_by"] = search.pattern if search else None
        if search or budget:
            out["layers"][lname] = {"search": search.to_dict() if search else None,
                                    "budget": budget.to_dict() if budget else None,
                                    "in_budget": lay["in_budget"]}
            if budget and not search:
                # Cost weight 0: quantizing it saves no budget and only adds to the score, so the solver never
                # picks it (ModelOpt's built-in recipes use this; it is not refused).
                out["layers"][lname]["note"] = SCORED_NEVER_QUANTIZED
    return out


def autoquant_state_summary(search_state: dict[str, Any], format_names: dict[str, str]) -> dict[str, Any]:
    """The search state's keys and its ``best`` summary (the full state lives in the search cache)."""
    name = recipe_namer(format_names)
    best = search_state["best"]
    return {
        "keys": sorted(search_state.keys()),
        "method": search_state.get("method"),
        "cost_model": search_state.get("cost_model"),
        "cost_denominator": _finite(search_state.get("cost_denominator") or 0.0),
        "disabled_layers": search_state.get("disabled_layers"),
        "num_groups": len(search_state["candidate_stats"]),
        "best": {
            "recipe": {k.removesuffix(".quant_recipe"): name(v) for k, v in best["recipe"].items()},
            "constraints": {k: _finite(v) for k, v in best["constraints"].items()},
            "score": _finite(best["score"]),
            "is_satisfied": bool(best["is_satisfied"]),
        },
    }


def build_manifest(
    *,
    scheme: dict[str, Any],
    model_info: dict[str, Any],
    calibration: dict[str, Any],
    model: nn.Module,
    search_state: dict[str, Any],
    format_names: dict[str, str],
    format_bits: dict[str, float],
    score_cache: dict[str, Any],
    search_setup: Any = None,
    timings: dict[str, float | None],
    artifacts: dict[str, str],
    run_id: str | None = None,
    sweep_id: str | None = None,
    serving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest dict from a finished search and the live quantized model (``serving``: the served
    semantics of its scales, ``autoquant.serving.serving_summary``)."""
    groups = sensitivity_table(search_state, format_names)
    layers = layer_table(model, groups, format_bits, unquantized_label(model_info["dtype"]))
    # Modules AutoQuant did not search (e.g. convolutions it skips) are not part of the study.
    searched = {m for info in groups.values() for m in info["module_names"]}
    layers = {n: lay for n, lay in layers.items() if n in searched or lay["kind"] in KINDS_ALWAYS}
    for lay in layers.values():
        group = groups.get(lay["search_group"]) if lay["search_group"] else None
        lay["in_budget"] = group is None or group["cost_weight"] > 0
    exclusions = exclusion_table(layers, search_setup)
    target = float(scheme["effective_bits"])
    record = search_state["best"].get("selection")  # the exact solve's record (solve.py); absent: solved elsewhere
    achieved = record.selection.effective_bits if record else search_state["best"]["constraints"].get("effective_bits")
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "sweep_id": sweep_id,
        "scheme": scheme,
        "model": model_info,
        "calibration": calibration,
        "effective_bits": {
            "target": target,
            "achieved": _finite(achieved) if achieved is not None else None,
            "measured": measured_effective_bits(layers),
            "measured_all_layers": measured_effective_bits(layers, budget_only=False),
            "counted_over": COUNTED_OVER[Scope.of(model_info)]
            + (f"; without {sum(not lay['in_budget'] for lay in layers.values())} cost-excluded layer(s), "
               "see exclusions" if not all(lay["in_budget"] for lay in layers.values()) else ""),
        },
        # Met = the result is within the target: the exact solve compares its summed cost with ModelOpt's cap
        # exactly; a state solved elsewhere keeps the float rule (achieved bits within 1e-6 of the target).
        "budget_met": (record.within_budget() if record else
                       achieved is not None and achieved <= target + 1e-6),
        "num_quantized_layers": sum(1 for lay in layers.values() if is_quantized_label(lay["dtype"])),
        "num_layers": len(layers),
        "towers": tower_summary(layers, groups),
        "exclusions": exclusions,
        "serving": serving,
        "layers": layers,
        "layer_sensitivity": groups,
        "autoquant_state": autoquant_state_summary(search_state, format_names),
        "selection": manifest_section(record),
        "score_cache": score_cache,
        "timings": timings,
        "artifacts": artifacts,
        "versions": versions(),
        "git_revision": git_revision(),
    }


def upgrade_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """A manifest of an older readable version as the current version says it (a new dict; ``data`` is kept).

    Version 1 labelled every unquantized layer ``bf16`` whatever the run's dtype: such a layer is relabelled by the
    run's ``model.dtype`` (a float32 CPU run's become ``fp32``).
    """
    if data.get("schema_version") == SCHEMA_VERSION:
        return data
    dtype = (data.get("model") or {}).get("dtype") if isinstance(data.get("model"), dict) else None
    label = unquantized_label(dtype) if dtype else "bf16"
    layers = {}
    for name, lay in data["layers"].items():
        if isinstance(lay, dict):
            lay = {**lay, **{k: label for k in ("dtype", "input_dtype") if lay.get(k) == "bf16"}}
        layers[name] = lay
    return {**data, "schema_version": SCHEMA_VERSION, "layers": layers}


def validate_manifest(data: Any, source: str = "manifest") -> dict[str, Any]:
    """Check a manifest's shape; raise UserError naming the first problem. Returns it in the current version
    (an older readable version upgraded in memory, see :func:`upgrade_manifest`)."""
    if not isinstance(data, dict):
        raise UserError(f"{source} is not a JSON object; it is not an autoquant manifest")
    version = data.get("schema_version")
    if version is None or "layers" not in data:
        raise UserError(f"{source} is not an autoquant manifest (no schema_version/layers)")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{source} has manifest schema_version {version}; this tool reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    if not isinstance(data["layers"], dict):
        raise UserError(f"{source} is corrupt: field 'layers' is missing or not a dict")
    data = upgrade_manifest(data)
    for key, typ in REQUIRED_KEYS.items():
        if not isinstance(data.get(key), typ):
            raise UserError(f"{source} is corrupt: field {key!r} is missing or not a {typ.__name__}")
    for lname, lay in data["layers"].items():
        missing = [k for k in LAYER_KEYS if k not in lay]
        if missing:
            raise UserError(f"{source} is corrupt: layer {lname} lacks {missing}")
    for group, info in data["layer_sensitivity"].items():
        missing = [k for k in GROUP_KEYS if k not in info]
        if missing:
            raise UserError(f"{source} is corrupt: group {group} lacks {missing}")
    return data


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a manifest file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"manifest {p} does not exist; run `autoquant run` first or check the path")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"manifest {p} is corrupt ({exc.__class__.__name__}); re-run the scheme to rewrite it") from exc
    return validate_manifest(data, str(p))


def write_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    """Validate, then write atomically."""
    validate_manifest(manifest, str(path))
    return atomic_write_json(path, manifest)
