"""``autoquant analyze``: tables, plots and analysis.md from sweep directories or manifests."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from auto_quantize_model.analysis import plots, summaries
from auto_quantize_model.analysis.aggregate import aggregate
from auto_quantize_model.analysis.readers import load_layers, load_trials
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
    cols = [c for c in ("scheme", "effective_bits_achieved", "kl_mean", "prefill_tokens_per_s", "prefill_vs_bf16",
                        "prefill_vs_uniform_fp8", "decode_tokens_per_s", "decode_vs_bf16", "lm_weight_vs_bf16",
                        "measure_batch_size", "measure_seq_len", "measure_device") if c in searched]
    rows = searched.dropna(subset=["prefill_tokens_per_s"])[cols].sort_values(["scheme", "effective_bits_achieved"])
    return ["### Measured cost (real FP8 layers)", "",
            "Prefill (compiled, `measure_batch_size` x `measure_seq_len` tokens) and decode tokens/s and LM weight "
            "memory of each trial's scheme as real FP8 layers, as ratios to BF16 and uniform FP8 measured the same "
            "way on the same worker (> 1: faster; for memory, larger). See docs/tables.md.", "", _md(rows)]


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
    configs = summaries.scoring_configs(layers, trials)
    agreement = summaries.rank_agreement(configs)
    made = [
        plots.plot_sensitivity_heatmaps(layers, out),
        plots.plot_inclusion(layers, out),
        plots.plot_pareto(trials, out),
        plots.plot_pareto_throughput(trials, out),
        plots.plot_rank_agreement(configs, out),
    ]
    written = [p for p in made if p is not None]
    flips = summaries.flip_budgets(layers)
    trial_cols = [c for c in ("scheme", "effective_bits_target", "effective_bits_achieved", "budget_met", "method",
                              "num_quantized_layers", "total_score", "perplexity", "kl_mean", "top1_agreement", "status")
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
    lines += ["## Trials", "", f"Evaluation metrics are against the unquantized checkpoint as loaded ({ref}).", "",
              _md(searched[trial_cols].sort_values(["scheme", "effective_bits_target"]))]
    if not controls.empty:
        ctl_cols = [c for c in ("trial_id", "quantization_formats", "effective_bits_achieved", "num_quantized_layers",
                                "num_layers", "num_calib_steps", "perplexity", "kl_mean", "top1_agreement")
                    if c in controls]
        lines += ["### Control: uniform FP8 PTQ", "",
                  "`mtq.quantize` with ModelOpt's format config as shipped (its name-pattern exclusions, e.g. "
                  "`*lm_head*`, stay unquantized), calibrated on the same calibration batches. An AutoQuant trial "
                  "beats it when it has lower KL at no more effective bits (red star in the Pareto plot).", "",
                  _md(controls[ctl_cols])]
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
              "Between scoring configurations (distinct formats, method, calibration data or steps); Spearman over "
              "search groups and overlap of the top 25% most sensitive groups.", "", _md(agreement)]
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
