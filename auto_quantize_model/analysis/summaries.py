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


def quantized(layers: pd.DataFrame) -> pd.Series:
    """Per layers row: quantized in some format (``dtype`` a format label, not an unquantized dtype such as ``bf16``
    or ``fp32``; tables written from version-1 manifests say ``bf16`` for every unquantized layer)."""
    from auto_quantize_model.autoquant.layers import UNQUANTIZED_LABELS

    return ~layers["dtype"].isin(UNQUANTIZED_LABELS)


def inclusion_curve(layers: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and effective-bits target: share of layers and of weights that are quantized."""
    df = layers.assign(quantized=quantized(layers))
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
    df = layers.assign(quantized=quantized(layers))
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


# What makes two scorings of one format the same computation: equal values here give equal scores (the candidate
# set and the scheme's name do not change a group's score for a format; shared scoring passes compute it once).
SCORING_INPUTS = ("method", "num_score_steps", "weights_fingerprint", "calibration_hash")
# Calibration settings that tell two independent scorings' data apart (anything else: other caption files).
DATA_SETTINGS = (("calib_seed", "seed"), ("calib_num_samples", "samples"), ("calib_chat_template", "chat template"))


def format_scores(layers: pd.DataFrame) -> pd.DataFrame:
    """Long form of the searched groups' scores: trial_id, search_group, format, score (``NONE`` and groups kept
    out of the search left out)."""
    cols = ["trial_id", "search_group", "format", "score"]
    df = layers.dropna(subset=["search_group"]).drop_duplicates(["trial_id", "search_group"])
    rows = [(t, g, f, s) for t, g, fmts, scores in zip(df["trial_id"], df["search_group"], df["candidate_formats"],
                                                        df["candidate_scores"])
            if fmts is not None and len(fmts) > 1
            for f, s in zip(fmts, scores) if f != "NONE" and s is not None and not pd.isna(s)]
    return pd.DataFrame(rows, columns=cols)


def independent_scorings(layers: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct scoring of a format: the format, its ``SCORING_INPUTS`` and data settings, the first
    trial that carries it, and a label. Trials whose scores are the same computation (same inputs) count once."""
    _, t = split_controls(trials)
    need = ["trial_id", *SCORING_INPUTS, *(c for c, _ in DATA_SETTINGS)]
    if t.empty or not set(need) <= set(t.columns):
        return pd.DataFrame(columns=["format", *need, "label"])
    per = format_scores(layers)[["trial_id", "format"]].drop_duplicates().merge(t[need], on="trial_id")
    per = per.dropna(subset=["calibration_hash"]).sort_values("trial_id")
    per = per.drop_duplicates(["format", *SCORING_INPUTS], keep="first").reset_index(drop=True)

    def label(r: Any) -> str:
        seed = "-" if pd.isna(r.calib_seed) else int(r.calib_seed)
        return (f"{r.format} / {r.method} / steps={int(r.num_score_steps)} / n={int(r.calib_num_samples)} / "
                f"seed={seed} / data {str(r.calibration_hash)[:8]}")

    return per.assign(label=[label(r) for r in per.itertuples()])


def rank_agreement(layers: pd.DataFrame, trials: pd.DataFrame, top_fraction: float = 0.25) -> pd.DataFrame:
    """Spearman and top-k overlap of group scores between independent scorings of the same format: same format,
    method, steps and weights, different calibration data (another seed, sample count, chat template or caption
    file). Scorings on the same data are the same computation (their agreement is 1 by construction) and scores of
    different formats measure different errors, so neither is compared."""
    cols = ["format", "scoring_a", "scoring_b", "differs", "groups", "spearman", "top_k", "top_k_overlap"]
    sc = independent_scorings(layers, trials)
    if len(sc) < 2:
        return pd.DataFrame(columns=cols)
    scores = format_scores(layers)
    rows = []
    same = ["format", "method", "num_score_steps", "weights_fingerprint"]
    for _, group in sc.groupby(same, dropna=False):
        for a, b in itertools.combinations(group.itertuples(), 2):
            col = {}
            for r in (a, b):
                s = scores[(scores["trial_id"] == r.trial_id) & (scores["format"] == r.format)]
                col[r.label] = s.set_index("search_group")["score"]
            pair = _pair_agreement(pd.DataFrame(col), a.label, b.label, top_fraction)
            if pair is None:
                continue
            differs = [word for c, word in DATA_SETTINGS if getattr(a, c) != getattr(b, c)] or ["captions"]
            rows.append({"format": a.format, "scoring_a": a.label, "scoring_b": b.label,
                         "differs": ", ".join(differs), **pair})
    return pd.DataFrame(rows, columns=cols)


def agreement_matrix(agreement: pd.DataFrame) -> pd.DataFrame:
    """The pairs of :func:`rank_agreement` as a symmetric Spearman matrix (NaN: not comparable, 1 on the diagonal)."""
    labels = list(dict.fromkeys([*agreement["scoring_a"], *agreement["scoring_b"]]))
    m = pd.DataFrame(np.nan, index=labels, columns=labels)
    for r in agreement.itertuples():
        m.loc[r.scoring_a, r.scoring_b] = m.loc[r.scoring_b, r.scoring_a] = r.spearman
    for lab in labels:
        m.loc[lab, lab] = 1.0
    return m


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
