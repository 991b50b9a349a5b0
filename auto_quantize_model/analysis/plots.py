"""PNG plots for ``autoquant analyze``; each draws one helper's DataFrame from summaries.py."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from auto_quantize_model.analysis import summaries  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sensitivity_heatmaps(layers: pd.DataFrame, out: Path) -> Path:
    """One panel per scheme: log10 sensitivity by decoder block (rows) and layer kind (columns)."""
    schemes = sorted(layers["scheme"].unique())
    fig, axes = plt.subplots(1, len(schemes), figsize=(3.2 * len(schemes) + 1, 4.5), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        grid = summaries.sensitivity_grid(layers, scheme)
        im = ax.imshow(grid.values, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=45)
        ax.set_yticks(range(len(grid.index)), [int(i) for i in grid.index])
        ax.set_title(scheme, fontsize=8)
        ax.set_xlabel("layer kind")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, label="log10 score")
    return _save(fig, out / "sensitivity_heatmap.png")


def plot_inclusion(layers: pd.DataFrame, out: Path) -> Path:
    """Share of quantized weights as the effective-bits budget moves, per scheme."""
    curve = summaries.inclusion_curve(layers)
    fig, ax = plt.subplots(figsize=(6, 4))
    for scheme, sub in curve.groupby("scheme"):
        ax.plot(sub["effective_bits_target"], sub["weight_share"], marker="o", label=scheme)
    ax.set_xlabel("effective-bits target")
    ax.set_ylabel("share of LM linear weights quantized")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "inclusion_curve.png")


def plot_pareto(trials: pd.DataFrame, out: Path) -> Path:
    """Total sensitivity score (and KL when measured) against achieved bits, Pareto front of the
    AutoQuant trials marked; the uniform FP8 PTQ control (KL panel) as a red star."""
    controls, trials = summaries.split_controls(trials)
    metrics = [("total_score", "total AutoQuant score")]
    if "kl_mean" in trials and trials["kl_mean"].notna().any():
        metrics.append(("kl_mean", f"mean KL vs unquantized ({summaries.reference_label(trials)})"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for ax, (col, label) in zip(axes[0], metrics):
        # The score is the search's own objective: its budget basis. KL is compared with the control, so it uses
        # the one basis both share (every LM Linear counted), when the tables have it.
        x = "effective_bits_achieved"
        if col == "kl_mean" and "effective_bits_all_layers" in trials and trials["effective_bits_all_layers"].notna().all():
            x = "effective_bits_all_layers"
        ok = trials.dropna(subset=[x, col])
        for scheme, sub in ok.groupby("scheme"):
            ax.scatter(sub[x], sub[col], label=scheme, s=25)
        front = summaries.pareto_front(ok, x=x, y=col)
        ax.plot(front[x], front[col], "k--", lw=1, label="Pareto front")
        ctl = controls.dropna(subset=[x, col]) if {x, col} <= set(controls) else controls.iloc[0:0]
        if not ctl.empty:
            ax.scatter(ctl[x], ctl[col], marker="*", s=180, c="red", edgecolors="k",
                       zorder=5, label="uniform FP8 PTQ (control)")
        ax.set_xlabel("effective bits over all LM Linears" if x == "effective_bits_all_layers" else "achieved effective bits")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "pareto.png")


def plot_pareto_throughput(trials: pd.DataFrame, out: Path) -> Path | None:
    """KL against measured FP8 prefill throughput (higher is better), when trials carry both."""
    cols = ["kl_mean", "prefill_tokens_per_s"]
    if not all(c in trials for c in cols) or trials.dropna(subset=cols).empty:
        return None
    ok = trials.dropna(subset=cols).assign(neg_prefill=lambda d: -d["prefill_tokens_per_s"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for scheme, sub in ok.groupby("scheme"):
        ax.scatter(sub["prefill_tokens_per_s"], sub["kl_mean"], label=scheme, s=25)
    front = summaries.pareto_front(ok, x="neg_prefill", y="kl_mean")
    ax.plot(front["prefill_tokens_per_s"], front["kl_mean"], "k--", lw=1, label="Pareto front")
    # The baselines each row was measured beside (sweep ``measure``), recovered from its ratios.
    for ratio, label, style in (("prefill_vs_bf16", "BF16", "g:"), ("prefill_vs_uniform_fp8", "uniform FP8", "r:")):
        if ratio in ok and ok[ratio].notna().any():
            x = (ok["prefill_tokens_per_s"] / ok[ratio]).median()
            ax.axvline(x, color=style[0], ls=style[1:], lw=1, label=f"{label} (measured, median {x:.4g})")
    ax.set_xlabel("measured prefill tokens/s (real FP8 layers, GPU)")
    ax.set_ylabel("mean KL vs BF16")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "pareto_throughput.png")


def plot_rank_agreement(configs: pd.DataFrame, out: Path) -> Path | None:
    """Spearman matrix of group sensitivity between scoring configurations."""
    if configs.shape[1] < 2:
        return None
    corr = configs.rank().corr(method="pearson")  # Pearson on ranks = Spearman
    n = len(corr)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * n + 3), 0.8 * n + 2 + 0.18 * n))
    im = ax.imshow(corr.values, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(n), [str(i + 1) for i in range(n)])
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
    # Configuration labels are long (scheme / method / samples / steps): list them under the matrix.
    ax.set_xlabel("\n".join(f"{i + 1}: {c}" for i, c in enumerate(corr.columns)), fontsize=7, loc="left")
    for i in range(len(corr)):
        for j in range(len(corr)):
            ax.text(j, i, f"{corr.values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="Spearman")
    return _save(fig, out / "rank_agreement.png")
