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


def point_label(row: pd.Series) -> str:
    """A trial's label on a plot: scheme, budget and the end of its id (analysis.md's tables give the whole id)."""
    target = row.get("effective_bits_target")
    budget = f"@{target:g}" if target is not None and not pd.isna(target) else ""
    return f"{row['scheme']}{budget} [{str(row['trial_id'])[-8:]}]"


def _exportable(df: pd.DataFrame) -> pd.Series:
    return df["exportable"].fillna(False).astype(bool) if "exportable" in df else pd.Series(False, index=df.index)


def _draw_front(ax, ok: pd.DataFrame, x: str, y: str) -> list[str]:
    """Points by scheme (filled: `autoquant export` takes them; hollow: it does not), the Pareto front of all
    trials and of the exportable ones, every front point numbered; returns the numbers' labels (scheme, budget, id)."""
    exportable = _exportable(ok)
    for i, (scheme, sub) in enumerate(ok.groupby("scheme")):
        color = f"C{i}"
        ex = exportable[sub.index]
        ax.scatter(sub.loc[ex, x], sub.loc[ex, y], s=28, color=color, label=scheme)
        ax.scatter(sub.loc[~ex, x], sub.loc[~ex, y], s=28, facecolors="none", edgecolors=color,
                   label=f"{scheme} (not exportable)" if (~ex).any() else None)
    front = summaries.pareto_front(ok, x=x, y=y)
    ax.plot(front[x], front[y], "k--", lw=1, label="Pareto front, all trials")
    front_ex = summaries.pareto_front(ok[exportable], x=x, y=y)
    if not front_ex.empty and not front_ex.index.equals(front.index):
        ax.plot(front_ex[x], front_ex[y], "g-", lw=1, alpha=0.7, label="Pareto front, exportable trials")
    labels = []
    on_front = ok.loc[list(dict.fromkeys([*front.index, *front_ex.index]))].sort_values([x, y])
    for k, (_, row) in enumerate(on_front.iterrows(), 1):
        ax.annotate(str(k), (row[x], row[y]), textcoords="offset points", xytext=(3, 3), fontsize=7)
        labels.append(f"{k}: {point_label(row)}" + ("" if bool(exportable[row.name]) else " (not exportable)"))
    values = ok[y].astype(float)
    if len(values) and (values > 0).all() and values.max() > 20 * values.min():
        ax.set_yscale("log")  # scores and KL span orders of magnitude
    return labels


def plot_pareto(trials: pd.DataFrame, out: Path) -> Path:
    """Total sensitivity score against bits over the budget's layers, and KL (when measured) against bits over
    all LM Linears, with the Pareto fronts; the uniform FP8 PTQ control (KL panel, all-layer basis) as a red star."""
    controls, trials = summaries.split_controls(trials)
    # The score is the search's own objective: its budget basis. KL is compared with the control, so it uses the
    # one basis both share (every LM Linear counted); the control has no budget basis and is drawn only there.
    metrics = [("total_score", "total AutoQuant score", "effective_bits_achieved",
                "effective bits over the budget's layers")]
    if "kl_mean" in trials and trials["kl_mean"].notna().any():
        metrics.append(("kl_mean", f"mean KL vs unquantized ({summaries.reference_label(trials)})",
                        "effective_bits_all_layers", "effective bits over all LM Linears (excluded ones at 16)"))
    n_front = len(trials)  # an upper bound on the labels listed under each panel
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.8 + 0.11 * min(n_front, 40)),
                             squeeze=False)
    for ax, (col, label, x, xlabel) in zip(axes[0], metrics):
        ok = trials.dropna(subset=[x, col]) if x in trials else trials.iloc[0:0]
        labels = _draw_front(ax, ok, x, col)
        # Numbered front points, listed under the panel (labels beside crowded points would overlap).
        xlabel += "\n\nPareto points (scheme@budget [end of the trial id]):\n" + "\n".join(labels)
        ctl = controls.dropna(subset=[x, col]) if {x, col} <= set(controls) else controls.iloc[0:0]
        if not ctl.empty:
            ax.scatter(ctl[x], ctl[col], marker="*", s=180, c="red", edgecolors="k",
                       zorder=5, label="uniform FP8 PTQ (control)")
        ax.set_xlabel(xlabel, fontsize=8, loc="left")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
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


def plot_rank_agreement(agreement: pd.DataFrame, out: Path) -> Path | None:
    """Spearman matrix of group scores between independent scorings of the same format (grey: not comparable)."""
    if agreement.empty:
        return None
    corr = summaries.agreement_matrix(agreement)
    n = len(corr)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * n + 3), 0.8 * n + 2 + 0.18 * n))
    cmap = matplotlib.colormaps["coolwarm"].with_extremes(bad="lightgrey")
    im = ax.imshow(corr.values, vmin=-1, vmax=1, cmap=cmap)
    ax.set_xticks(range(n), [str(i + 1) for i in range(n)])
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
    # Scoring labels are long (format / method / steps / samples / seed / data): list them under the matrix.
    ax.set_xlabel("\n".join(f"{i + 1}: {c}" for i, c in enumerate(corr.columns)), fontsize=7, loc="left")
    for i in range(n):
        for j in range(n):
            if not pd.isna(corr.values[i, j]):
                ax.text(j, i, f"{corr.values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title("independent scorings of one format (other data or seed)", fontsize=8)
    fig.colorbar(im, ax=ax, label="Spearman")
    return _save(fig, out / "rank_agreement.png")
