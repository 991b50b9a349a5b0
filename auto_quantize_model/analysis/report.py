"""``autoquant analyze``: tables, plots and analysis.md from sweep directories or manifests."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from auto_quantize_model.analysis import plots, summaries
from auto_quantize_model.analysis.aggregate import aggregate
from auto_quantize_model.analysis.pick import (
    ShipRule,
    candidates,
    numbers,
    pick,
    ranked,
    standard_rules,
    winner_formats,
)
from auto_quantize_model.analysis.readers import load_layers, load_trials
from auto_quantize_model.analysis.ship import ship_command
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_text

log = logging.getLogger(__name__)


def _md(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    if df.empty:
        return "_none_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _measured_cost_section(searched: pd.DataFrame) -> list[str]:
    """Trials measured as real FP8 (sweep ``measure``): speed and weight memory against their worker's baselines."""
    if "prefill_tokens_per_s" not in searched or searched["prefill_tokens_per_s"].isna().all():
        return []
    cols = [c for c in ("trial_id", "scheme", "effective_bits_all_layers", "kl_mean", "prefill_tokens_per_s", "prefill_vs_bf16",
                        "prefill_vs_uniform_fp8", "decode_tokens_per_s", "decode_vs_bf16", "lm_weight_vs_bf16",
                        "measure_batch_size", "measure_seq_len", "measure_device") if c in searched]
    rows = searched.dropna(subset=["prefill_tokens_per_s"])[cols].sort_values(["scheme", "effective_bits_all_layers"])
    return ["### Measured cost (real FP8 layers)", "",
            "Prefill (compiled, `measure_batch_size` x `measure_seq_len` tokens) and decode tokens/s and LM weight "
            "memory of each trial's scheme as real FP8 layers, as ratios to BF16 and uniform FP8 measured the same "
            "way on the same worker (> 1: faster; for memory, larger). See docs/tables.md.", "", _md(rows)]


def _ship_section(trials: pd.DataFrame, sources: list[str]) -> list[str]:
    """Which trial to ship under a few standard rules, and the command that exports it (analysis/pick.py)."""
    lines = ["## Which trial to ship", "",
             "Each rule names the trial it picks and the command that ships it: the command exports the trial as a "
             "Hugging Face checkpoint and prints how to serve it (vLLM, SGLang). Bits are over all LM Linears (layers "
             "a scheme keeps out of its budget count at 16). Only exportable trials ship (`exportable`: `autoquant "
             "export` takes their formats); where a rule's overall winner is not, the best exportable trial is named "
             "(`--exportable-only`). Any trial below ships with `autoquant ship SOURCES --trial ID --output-dir DIR`; "
             "`autoquant ship --help` lists the rules (bits, measured speed, KL, perplexity).", ""]
    pool = candidates(trials)
    rules = standard_rules(trials)
    if not rules:
        lines += ["No evaluation metrics (run the sweep with `evaluate = true`), so no rule can rank the trials. "
                  f"Exportable trials: {int(pool['exportable'].sum())} of {len(pool)}; ship one by id:", ""]
        if not pool.empty and pool["exportable"].any():
            first = pool[pool["exportable"]].iloc[0]
            lines += ["```", ship_command(sources, ShipRule(trial=str(first["trial_id"])), f"exports/{first['trial_id']}"),
                      "```", ""]
        return lines
    for i, std in enumerate(rules, 1):
        rule, note = std.rule, ""
        fits = ranked(trials, rule) if not pool.empty else pool
        if not fits.empty and not fits.iloc[0]["exportable"]:
            top = fits.iloc[0]
            note = (f" (The rule's overall winner, `{top['trial_id']}`, is not exportable: {winner_formats(top)}; "
                    "this is the best exportable trial.)")
            rule = dataclasses.replace(rule, exportable_only=True)
        try:
            chosen = pick(trials, rule)
        except UserError as exc:
            lines += [f"**{i}. {std.title}**: nothing to ship: {exc}.", ""]
            continue
        w = chosen.winner
        lines += [f"**{i}. {std.title}**: ship `{w['trial_id']}` ({w['scheme']}, budget "
                  f"{w['effective_bits_target']:g}): {numbers(w)}.{note}", "",
                  "```", ship_command(sources, rule, f"exports/{w['trial_id']}"), "```", ""]
    return lines


def _pareto_section(searched: pd.DataFrame) -> list[str]:
    """The trials on the KL / all-layer-bits Pareto front, labelled as in pareto.png."""
    x, y = "effective_bits_all_layers", "kl_mean"
    if y not in searched or searched[y].isna().all():
        return []
    front = summaries.pareto_front(searched, x=x, y=y)
    cols = [c for c in ("trial_id", "scheme", "effective_bits_target", "effective_bits_achieved", x, y, "perplexity",
                        "exportable") if c in front]
    return ["## Pareto front: KL against bits over all LM Linears", "",
            "Trials no other trial beats on both (pareto.png labels them scheme@budget [end of the id]; hollow "
            "points there are not exportable).", "", _md(front[cols])]


def analyze(sources: list[str], output_dir: str | Path, workers: int = 1) -> dict[str, Any]:
    """Refresh ``output_dir/tables`` from ``sources``, then write plots and analysis.md."""
    out = Path(output_dir)
    t0 = time.perf_counter()
    agg = aggregate(sources, out / "tables", workers=workers)
    t_tables = time.perf_counter() - t0
    # Only the trials these sources produced: the tables root may hold older trials too.
    ids = sorted(set(agg["trial_ids"].values()))
    trials = load_trials(out / "tables", filters=[("trial_id", "in", ids)])
    layers = load_layers(out / "tables", filters=[("trial_id", "in", ids)])
    agreement = summaries.rank_agreement(layers, trials)
    made = [
        plots.plot_sensitivity_heatmaps(layers, out),
        plots.plot_inclusion(layers, out),
        plots.plot_pareto(trials, out),
        plots.plot_pareto_throughput(trials, out),
        plots.plot_rank_agreement(agreement, out),
    ]
    written = [p for p in made if p is not None]
    flips = summaries.flip_budgets(layers)
    # One bits basis per column: the budget's (over the layers the search's budget counts) and every LM Linear's.
    trial_cols = [c for c in ("trial_id", "scheme", "effective_bits_target", "effective_bits_achieved",
                              "effective_bits_all_layers", "budget_met", "method", "num_quantized_layers",
                              "total_score", "perplexity", "kl_mean", "top1_agreement", "exportable", "status",
                              "manifest_path")
                  if c in trials]
    lines = [
        "# AutoQuant analysis",
        "",
        f"{agg['num_trials']} trials from {agg['num_manifests']} manifests; {len(agg['skipped'])} sources skipped. "
        f"Tables: `{out / 'tables'}` (load with `auto_quantize_model.analysis.load_layers/load_trials`).",
        "",
    ]
    if agg["skipped"]:
        lines += ["Skipped:", ""] + [f"- `{s}`: {r}" for s, r in agg["skipped"]] + [""]
    controls, searched = summaries.split_controls(trials)
    ref = summaries.reference_label(trials)
    lines += _ship_section(trials, sources)
    lines += ["## Trials", "",
              f"Evaluation metrics are against the unquantized checkpoint as loaded ({ref}). Bits: "
              "`effective_bits_achieved` over the layers the search's budget counts (the target's basis), "
              "`effective_bits_all_layers` over every LM Linear with excluded layers at 16 (what ships; the basis "
              "shared with the control). `exportable`: `autoquant export` takes the trial's formats.", "",
              _md(searched[trial_cols].sort_values(["scheme", "effective_bits_target"]))]
    if not controls.empty:
        ctl_cols = [c for c in ("trial_id", "quantization_formats", "effective_bits_all_layers", "num_quantized_layers",
                                "num_layers", "num_calib_steps", "perplexity", "kl_mean", "top1_agreement")
                    if c in controls]
        lines += ["### Control: uniform FP8 PTQ", "",
                  "`mtq.quantize` with ModelOpt's format config as shipped (its name-pattern exclusions, e.g. "
                  "`*lm_head*`, stay unquantized), calibrated on the same calibration batches. It has no budget, so "
                  "only its bits over all LM Linears are given. An AutoQuant trial beats it when it has lower KL at "
                  "no more `effective_bits_all_layers` (red star in the Pareto plot).", "",
                  _md(controls[ctl_cols])]
    lines += _pareto_section(searched)
    lines += _measured_cost_section(searched)
    lines += ["## Most sensitive groups per scheme", ""]
    for scheme, sub in layers.groupby("scheme", observed=True):
        top = (sub.groupby("search_group", observed=True)["sensitivity"].mean().nlargest(8).reset_index())
        lines += [f"**{scheme}**", "", _md(top)]
    lines += ["## Budget at which each layer flips to FP8", "",
              "`flip_budget`: the highest effective-bits target at which the layer is quantized (empty = never); "
              "`inclusion_rate`: share of that scheme's trials in which it is quantized. Highest flip budget first.", ""]
    for scheme, sub in flips.groupby("scheme", observed=True):
        lines += [f"**{scheme}**", "", _md(sub.drop(columns="scheme").head(12))]
    lines += ["## Rank agreement of layer sensitivity", "",
              "Only between independent scorings of the same format: same format, method, steps and weights, "
              "different calibration data (`differs`: seed, sample count, chat template, or other captions). "
              "Scorings on the same data are the same computation (agreement 1 by construction), and scores of "
              "different formats (e.g. INT4 against FP8) measure different errors: neither is compared. Spearman over "
              "search groups and overlap of the top 25% most sensitive groups.", ""]
    if agreement.empty:
        lines += ["No format was scored on two different calibration sets, so there is nothing independent to "
                  "compare; repeat a sweep (or runs) with another `seed` or other captions to measure how much the "
                  "ranking depends on the data.", ""]
    else:
        lines += [_md(agreement)]
    seeds = summaries.seed_variance(layers, trials)
    lines += ["## Seed variance of sensitivity rankings", ""]
    if seeds.empty:
        lines += ["No setting was scored with more than one calibration seed; repeat a sweep (or runs) with a "
                  "different `seed` to measure how much the ranking depends on the calibration sample.", ""]
    else:
        lines += ["Same scheme, method, formats, steps, sample count and chat-template setting, different "
                  "calibration seed: Spearman and top-25% overlap of group sensitivity between the two seeds, and "
                  "the median coefficient of variation of a group's score across all seeds of the setting. "
                  "Rank differences between scoring configurations smaller than these are within seed noise.", "",
                  _md(seeds)]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in written] + [""]
    report = atomic_write_text(out / "analysis.md", "\n".join(lines))
    log.info("analysis of %d trials: tables %.2fs, total %.2fs", agg["num_trials"], t_tables, time.perf_counter() - t0)
    return {**agg, "report": report, "plots": written, "tables_seconds": t_tables,
            "total_seconds": time.perf_counter() - t0}
