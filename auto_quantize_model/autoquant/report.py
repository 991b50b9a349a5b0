"""The Markdown sensitivity report, rendered from a manifest alone (so ``--report-only`` needs no model)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from auto_quantize_model.autoquant.layers import is_quantized_label
from auto_quantize_model.models.scope import Scope

REPORT_NAME = "layer-sensitivity-report.md"


def report_path(output_dir: str | Path) -> Path:
    """``<output-dir>/layer-sensitivity-report.md``."""
    return Path(output_dir) / REPORT_NAME


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _top_score(info: dict[str, Any]) -> float:
    """A group's sensitivity: the score of its most aggressive candidate (NONE scores 0)."""
    scores = [s for s in info["scores"] if s is not None]
    return max(scores) if scores else 0.0


def _group_bits(info: dict[str, Any]) -> float | None:
    chosen = info["chosen_format"]
    if not info["uncompressed_cost"]:
        return None  # cost-excluded: outside the budget, no bits figure
    if chosen in info["candidate_formats"]:
        i = info["candidate_formats"].index(chosen)
        return 16.0 * info["costs"][i] / info["uncompressed_cost"]
    return 16.0


def _summary(m: dict[str, Any]) -> list[str]:
    s, eb, cal, mod = m["scheme"], m["effective_bits"], m["calibration"], m["model"]
    t = m["timings"]
    cache = m.get("score_cache", {})
    unq = mod.get("reference_label", "BF16")
    use = cal.get("usage")
    used = (f"; ModelOpt calibrated on {use['calibrate']['samples']} samples ({use['calibrate']['tokens']} tokens, "
            f"{use['calibrate']['steps']} steps) and scored on {use['score']['samples']} samples "
            f"({use['score']['tokens']} tokens, {use['score']['steps']} steps)") if use else ""
    chat = cal.get("chat_template")
    wrapped = (f"; each caption wrapped in the checkpoint's chat template as the assistant's reply to "
               f"\"{chat['user_prompt']}\"") if chat else "; raw captions (no chat template)"
    return [
        f"# Layer sensitivity: {s['name']}",
        "",
        f"- Model: `{mod['path']}` ({mod['architecture']}, config `{mod['config_hash'][:12]}`), "
        f"{mod['parameter_counts'].get('searchable_linear_weights', 0):,} searchable LM linear weights",
        f"- Formats: {', '.join(s['quantization_formats'])} or unquantized ({unq}); method `{s['method']}`, "
        f"{s['num_calib_steps']} calibration / {s['num_score_steps']} scoring batches",
        f"- Calibration: {cal['num_samples']} captions from `{cal['source_path']}` "
        f"(batch {cal['batch_size']}, max length {cal['seq_len']}, seed {cal['seed']}, {cal['num_tokens']} tokens)"
        f"{used}{wrapped}",
        f"- Effective bits: target {_fmt(eb['target'])}, achieved {_fmt(eb['achieved'])}, measured on the "
        f"quantized model {_fmt(eb['measured'])}; budget met: **{'yes' if m['budget_met'] else 'NO'}**",
        f"- Quantized layers: {m['num_quantized_layers']} of {m.get('num_layers', len(m['layers']))}",
        _serving_line(m.get("serving")),
        *_selection_lines(m.get("selection")),
        f"- Scores: {'reused from the search cache' if cache.get('reused') else 'computed in this run'} "
        f"(key `{cache.get('key', '?')}`); total time {_fmt(t.get('total'), '.2f')} s",
        "",
        "Higher score = more sensitive: the loss increase estimated for quantizing that group. Scores are "
        "comparable within a run, not across runs with different data sizes or step counts: each is a sum over "
        "scoring steps and over the group's member modules, clamped by ModelOpt to be non-increasing along the "
        "candidate list (docs/manifest.md). Costs and effective bits count an unquantized weight as 16 bits "
        f"whatever dtype the reference runs in ({unq} here).",
        "",
    ]


def _serving_line(serving: dict[str, Any] | None) -> str:
    """What an engine serves: the scales' fused-group semantics (autoquant/serving.py)."""
    if not serving:
        return "- Serving: separate q/k/v and gate/up scales (run made before served semantics were recorded)"
    if serving["fused_scales"] == "shared":
        return ("- Serving: shared fused scales, as vLLM, SGLang and TensorRT-LLM run q/k/v and gate/up (one weight "
                "and one input scale per group): the scores and metrics are those of the served model")
    return ("- Serving: **separate** q/k/v and gate/up scales; engines that fuse them requantize to the group's max, "
            "so they serve a slightly different model than this run scored")


def _selection_lines(sel: dict[str, Any] | None) -> list[str]:
    """How the choice was solved, and whether ModelOpt's own solve would have chosen otherwise (and by how much)."""
    if not sel:
        return []
    what = "summed score" if sel["objective"] == "min-sum" else "largest chosen score"
    proof = "proven optimal" if sel["optimal"] else f"not proven: certified gap {_fmt(sel['gap'])}"
    lines = [f"- Selection: exact ({sel['objective']}: {what}; {proof}; {sel['seconds'] * 1e3:.1f} ms)"]
    mo = sel.get("modelopt")
    if not mo:
        return lines
    if mo["differs"] is None:
        lines.append(f"- ModelOpt's own solve ({mo['solver']}) gave no choice: {mo['error'] or mo['status']}")
    elif not mo["differs"]:
        lines.append(f"- ModelOpt's own solve ({mo['solver']}, status {mo['status']}) chooses the same layers")
    else:
        groups = mo["differing_groups"]
        shown = ", ".join(f"`{g}`" for g in groups[:8]) + (f" and {len(groups) - 8} more" if len(groups) > 8 else "")
        rel = f", {mo['relative_score_gap']:+.1%}" if mo["relative_score_gap"] is not None else ""
        budget = "" if mo["within_budget"] else "; its choice is over the budget"
        lines.append(f"- **ModelOpt's own solve ({mo['solver']}, status {mo['status']}) would choose differently** in "
                     f"{len(groups)} group(s) ({shown}): {what} {_fmt(mo['objective_value'])} against "
                     f"{_fmt(mo['objective_value'] - mo['score_gap'])} here ({_fmt(mo['score_gap'], '+.3g')}{rel}), "
                     f"{_fmt(mo['effective_bits'], '.3f')} bits{budget}")
    return lines


def _group_table(m: dict[str, Any]) -> list[str]:
    groups = m["layer_sensitivity"]
    unq = m["model"].get("reference_label", "BF16")
    # Union over groups, in candidate order: groups kept out of the search offer NONE alone.
    formats = list(dict.fromkeys(f for info in groups.values() for f in info["candidate_formats"] if f != "NONE"))
    head = ["rank", "group", "block", "kinds", "chosen", *[f"score {f}" for f in formats], "cost (16-bit units)", "bits"]
    lines = ["## Groups by sensitivity", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(groups.items(), key=lambda kv: _top_score(kv[1]), reverse=True)
    for rank, (name, info) in enumerate(ordered, 1):
        scores = dict(zip(info["candidate_formats"], info["scores"]))
        chosen = info["chosen_format"]
        row = [
            str(rank), f"`{name}`", "-" if info["block_index"] is None else str(info["block_index"]),
            "/".join(info["kinds"]), unq if chosen == "NONE" else f"**{chosen}**",
            *[_fmt(scores.get(f)) for f in formats], f"{info['uncompressed_cost']:,.0f}", _fmt(_group_bits(info), ".1f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _rollup(m: dict[str, Any], key: str, title: str) -> list[str]:
    agg: dict[Any, dict[str, float]] = defaultdict(lambda: {"layers": 0, "quantized": 0, "params": 0, "qparams": 0})
    for lay in m["layers"].values():
        k = lay.get(key, "language") if lay.get(key, "-") is not None else "-"
        a = agg[k]
        a["layers"] += 1
        a["params"] += lay["num_params"]
        if is_quantized_label(lay["dtype"]):
            a["quantized"] += 1
            a["qparams"] += lay["num_params"]
    score: dict[Any, float] = defaultdict(float)
    for info in m["layer_sensitivity"].values():
        if key == "block_index":
            keys = {info["block_index"]}
        elif key == "tower":
            keys = {info.get("tower", "language")}
        else:
            keys = set(info["kinds"])
        for k in keys:
            score["-" if k is None else k] += _top_score(info)
    lines = [f"## {title}", "", f"| {key} | layers | quantized | quantized weight share | summed score |", "|---|---|---|---|---|"]
    for k in sorted(agg, key=lambda x: (isinstance(x, str), x)):
        a = agg[k]
        share = a["qparams"] / a["params"] if a["params"] else 0.0
        lines.append(f"| {k} | {a['layers']} | {a['quantized']} | {share:.1%} | {_fmt(score.get(k, 0.0))} |")
    return lines + [""]


def _exclusions(m: dict[str, Any]) -> list[str]:
    """Layers kept out of the search or the budget, each with the pattern (and its source) that did it."""
    ex = m.get("exclusions") or {}
    rows = ex.get("layers") or {}
    if not rows:
        return ["## Excluded layers", "", "None: every searchable layer was searched and counted in the budget.", ""]
    lines = ["## Excluded layers", "",
             f"{len(ex.get('disabled_layers', []))} search-exclusion and {len(ex.get('cost_excluded_layers', []))} "
             "budget-exclusion patterns; layers they matched (kept BF16 if out of the search; outside the "
             "effective-bits budget if out of the budget):", "",
             "| layer | out of search by | out of budget by | note |", "|---|---|---|---|"]

    def cell(e: dict[str, str] | None) -> str:
        return "-" if e is None else f"`{e['pattern']}` ({e['source']})"

    for name, info in rows.items():
        note = info.get("note") or (info["search"] or {}).get("reason") or "-"
        lines.append(f"| `{name}` | {cell(info['search'])} | {cell(info['budget'])} | {note} |")
    return lines + [""]


def render_report(manifest: dict[str, Any]) -> str:
    """Full report text: summary, exclusions, groups sorted by sensitivity, per-block and per-kind roll-ups."""
    lines = _summary(manifest) + _exclusions(manifest) + _group_table(manifest)
    if Scope.of(manifest["model"]) is Scope.WHOLE_VLM:
        lines += _rollup(manifest, "tower", "Per tower")
    lines += _rollup(manifest, "block_index", "Per block")
    lines += _rollup(manifest, "kind", "Per layer kind")
    return "\n".join(lines)
