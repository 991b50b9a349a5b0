"""The numbers behind every plot, as pandas helpers a notebook can call directly."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd


def sensitivity_grid(layers: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """block_index x kind of log10 sensitivity for one scheme (mean over its trials)."""
    df = layers[(layers["scheme"] == scheme) & layers["block_index"].notna()]
    df = df.assign(log10_sensitivity=np.log10(df["sensitivity"].clip(lower=1e-30)))
    grid = df.pivot_table(index="block_index", columns="kind", values="log10_sensitivity", aggfunc="mean")
    order = [k for k in ("q", "k", "v", "o", "gate", "up", "down") if k in grid.columns]
    return grid[order + [c for c in grid.columns if c not in order]]


def inclusion_curve(layers: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and effective-bits target: share of layers and of weights that are quantized."""
    df = layers.assign(quantized=layers["dtype"] != "bf16")
    df = df.assign(qparams=df["num_params"] * df["quantized"])
    g = df.groupby(["scheme", "effective_bits_target"], observed=True)
    out = pd.DataFrame({
        "layer_share": g["quantized"].mean(),
        "weight_share": g["qparams"].sum() / g["num_params"].sum(),
        "trials": g["trial_id"].nunique(),
    })
    return out.reset_index().sort_values(["scheme", "effective_bits_target"])


def flip_budgets(layers: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and layer: the highest bits target at which it is quantized (NaN = never), and how
    often it is quantized across that scheme's targets."""
    df = layers.assign(quantized=layers["dtype"] != "bf16")
    g = df.groupby(["scheme", "layer"], observed=True)
    flip = df[df["quantized"]].groupby(["scheme", "layer"], observed=True)["effective_bits_target"].max()
    out = pd.DataFrame({"inclusion_rate": g["quantized"].mean(), "flip_budget": flip,
                        "sensitivity": g["sensitivity"].mean(), "kind": g["kind"].first(),
                        "block_index": g["block_index"].first()})
    return out.reset_index().sort_values(["scheme", "flip_budget"], ascending=[True, False])


def pareto_front(trials: pd.DataFrame, x: str = "effective_bits_achieved", y: str = "total_score") -> pd.DataFrame:
    """Trials not dominated in (lower x, lower y)."""
    df = trials.dropna(subset=[x, y]).sort_values([x, y])
    best = np.inf
    keep = []
    for idx, val in zip(df.index, df[y]):
        if val < best:
            keep.append(idx)
            best = val
    return df.loc[keep]


def scoring_configs(layers: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Group-level sensitivity per scoring configuration (one column per distinct score cache key).

    Trials that share calibration, method, steps and formats share scores; each configuration is
    labelled "scheme / method / n=samples / steps=score steps" after its first trial.
    """
    t = trials.dropna(subset=["score_cache_key"]).drop_duplicates("score_cache_key")
    cols = {}
    for _, row in t.iterrows():
        label = f"{row['scheme']} / {row['method']} / n={row['calib_num_samples']} / steps={row['num_score_steps']}"
        if "calib_seed" in row and pd.notna(row["calib_seed"]) and row["calib_seed"]:
            label += f" / seed={int(row['calib_seed'])}"
        sub = layers[layers["trial_id"] == row["trial_id"]]
        cols[label] = sub.groupby("search_group")["sensitivity"].first()
    return pd.DataFrame(cols)


def rank_agreement(configs: pd.DataFrame, top_fraction: float = 0.25) -> pd.DataFrame:
    """Pairwise Spearman correlation and top-k overlap of group sensitivity between configurations."""
    rows = []
    for a, b in itertools.combinations(configs.columns, 2):
        pair = _pair_agreement(configs, a, b, top_fraction)
        if pair is not None:
            rows.append({"config_a": a, "config_b": b, **pair})
    return pd.DataFrame(rows, columns=["config_a", "config_b", "groups", "spearman", "top_k", "top_k_overlap"])


def _pair_agreement(scores: pd.DataFrame, a: Any, b: Any, top_fraction: float) -> dict[str, Any] | None:
    """Spearman and top-k overlap of two score columns over the groups both have (None under 3 groups)."""
    from auto_quantize_model.inference.metrics import spearman

    both = scores[[a, b]].dropna()
    if len(both) < 3:
        return None
    k = max(1, round(top_fraction * len(both)))
    top_a, top_b = set(both[a].nlargest(k).index), set(both[b].nlargest(k).index)
    return {"groups": len(both), "spearman": spearman(list(both[a]), list(both[b])), "top_k": k,
            "top_k_overlap": len(top_a & top_b) / k}


def split_controls(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(control rows, AutoQuant trial rows); tables written before controls existed have no controls."""
    if "is_control" not in trials:
        return trials.iloc[0:0], trials
    is_ctl = trials["is_control"].fillna(False).astype(bool)
    return trials[is_ctl], trials[~is_ctl]


def reference_label(trials: pd.DataFrame) -> str:
    """What the unquantized reference ran in (``BF16``, ``float32``, ...), from the trials' model dtype."""
    from auto_quantize_model.models.loading import reference_label as label

    if "reference_dtype" not in trials:
        return "unknown dtype"
    dtypes = sorted({label(d) for d in trials["reference_dtype"].dropna()})
    return "/".join(dtypes) or "unknown dtype"


SEED_SETTING = ("scheme", "method", "quantization_formats", "num_score_steps", "num_calib_steps",
                "calib_num_samples", "calib_chat_template", "model_id")


def seed_variance(layers: pd.DataFrame, trials: pd.DataFrame, top_fraction: float = 0.25) -> pd.DataFrame:
    """For every setting scored with two or more calibration seeds: pairwise Spearman and top-k overlap
    of group sensitivity between seeds, plus the median coefficient of variation of group scores.

    A setting is everything that decides a scoring pass except the seed (``SEED_SETTING``).
    """
    cols = ["setting", "seed_a", "seed_b", "groups", "spearman", "top_k", "top_k_overlap", "median_cv"]
    _, t = split_controls(trials)
    need = [c for c in SEED_SETTING if c in t] + ["calib_seed", "trial_id", "score_cache_key"]
    if "calib_seed" not in t:
        return pd.DataFrame(columns=cols)
    t = t.dropna(subset=["calib_seed", "score_cache_key"])[need].drop_duplicates("score_cache_key")
    rows = []
    keys = [c for c in SEED_SETTING if c in t]
    for setting, sub in t.groupby(keys, observed=True, dropna=False):
        sub = sub.drop_duplicates("calib_seed")
        if len(sub) < 2:
            continue
        scores = pd.DataFrame({int(r.calib_seed): layers[layers["trial_id"] == r.trial_id]
                               .groupby("search_group")["sensitivity"].first() for r in sub.itertuples()})
        cv = (scores.std(axis=1) / scores.mean(axis=1).abs()).median()
        label = " / ".join(str(v) for v in (setting[:3] + setting[3:6]))
        for a, b in itertools.combinations(scores.columns, 2):
            pair = _pair_agreement(scores, a, b, top_fraction)
            if pair is not None:
                rows.append({"setting": label, "seed_a": a, "seed_b": b, **pair, "median_cv": float(cv)})
    return pd.DataFrame(rows, columns=cols)
