"""Which trial to ship: a rule over the trials table's rows, its winner, runner-up, or a one-line refusal.

A rule is a set of constraints plus an objective. Constraints: at most ``max_bits`` effective bits (on a stated basis:
every LM Linear, or the layers the budget counts), at least ``min_prefill_speedup`` times BF16's measured prefill,
at most ``max_kl`` mean KL, at most ``max_ppl_increase`` percent perplexity above the unquantized model. Objective:
the lowest KL when a bits or speed limit is given (the most accurate model that fits), else the fewest bits on the
basis (the most compressed model that is accurate enough). Ties on the objective go to the other one (fewer bits,
resp. lower KL), then to the smaller trial id. ``trial`` names one trial instead of a rule.

The rows are the trials table's (``records.outcome.TrialOutcome``), so ``autoquant ship`` and ``analysis.md`` judge
the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from auto_quantize_model.errors import UserError
from auto_quantize_model.settings import setting, validate_settings

# --bits-basis value -> trials column.
BITS_BASES = {"all-layers": "effective_bits_all_layers", "budget": "effective_bits_achieved"}
BASIS_WORDS = {"all-layers": "bits over all LM Linears", "budget": "bits over the budget's layers"}
# Limits are met within this relative slack, so a limit printed with 6 significant digits (analysis.md's commands)
# still admits the trial whose value it was printed from.
SLACK = 1e-6


@dataclass(frozen=True)
class ShipRule:
    """What to ship: limits and the objective they imply, or one trial by id. Declared once for ``autoquant ship``'s
    flags and the Python API (settings.py)."""

    max_bits: float | None = setting(
        None, kind="number?", flag="--max-bits", minimum=0,
        help="at most this many effective bits (basis: --bits-basis); the lowest KL wins")
    bits_basis: str = setting(
        "all-layers", kind="str", flag="--bits-basis", choices=tuple(BITS_BASES),
        help="bits over every LM Linear, excluded layers at 16 (all-layers, default: what ships and the basis the "
             "uniform FP8 control shares), or over the layers the search's budget counts (budget)")
    min_prefill_speedup: float | None = setting(
        None, kind="number?", flag="--min-prefill-speedup", minimum=0,
        help="at least this prefill speed-up over BF16, as the sweep measured it (--measure); the lowest KL wins")
    max_kl: float | None = setting(
        None, kind="number?", flag="--max-kl", minimum=0,
        help="at most this mean KL vs the unquantized model; the fewest bits win")
    max_ppl_increase: float | None = setting(
        None, kind="number?", flag="--max-ppl-increase", minimum=0,
        help="perplexity at most this many percent above the unquantized model's; the fewest bits win")
    trial: str | None = setting(
        None, kind="str?", flag="--trial", help="ship this trial (its id, or a unique part of it) instead of a rule")
    exportable_only: bool = setting(
        False, kind="bool", flag="--exportable-only",
        help="apply the rule among exportable trials only (default: refuse a winner export cannot take)")

    def __post_init__(self) -> None:
        # Limits first, named by their flags (validate_settings would name the field, and lets NaN through).
        for name, v in (("max-bits", self.max_bits), ("min-prefill-speedup", self.min_prefill_speedup),
                        ("max-kl", self.max_kl), ("max-ppl-increase", self.max_ppl_increase)):
            if isinstance(v, (int, float)) and (not math.isfinite(v) or v < 0):
                raise UserError(f"--{name} must be a finite number >= 0, got {v!r}")
        validate_settings(self, "ship rule")
        limits = [self.max_bits, self.min_prefill_speedup, self.max_kl, self.max_ppl_increase]
        if self.trial is not None and any(v is not None for v in limits):
            raise UserError("--trial names the trial to ship; drop the rule flags (--max-bits, --min-prefill-speedup, "
                            "--max-kl, --max-ppl-increase) or drop --trial")
        if self.trial is None and all(v is None for v in limits):
            raise UserError("give a rule: --max-bits B, --min-prefill-speedup X, --max-kl K or --max-ppl-increase PCT "
                            "(or --trial ID)")

    @property
    def bits_column(self) -> str:
        return BITS_BASES[self.bits_basis]

    @property
    def objective(self) -> str:
        """``kl`` (lowest KL) when a bits or speed limit is given, else ``bits`` (fewest bits on the basis)."""
        return "kl" if self.max_bits is not None or self.min_prefill_speedup is not None else "bits"

    def describe(self) -> str:
        """The rule in words, e.g. ``lowest KL within 10 bits over all LM Linears``."""
        if self.trial is not None:
            return f"trial {self.trial} as named"
        limits = []
        if self.max_bits is not None:
            limits.append(f"within {self.max_bits:g} {BASIS_WORDS[self.bits_basis]}")
        if self.min_prefill_speedup is not None:
            limits.append(f"at >= {self.min_prefill_speedup:g}x BF16 prefill (measured)")
        if self.max_kl is not None:
            limits.append(f"at KL <= {self.max_kl:.6g}")
        if self.max_ppl_increase is not None:
            limits.append(f"at perplexity <= +{self.max_ppl_increase:g}% over the unquantized model")
        goal = "lowest KL" if self.objective == "kl" else f"fewest {BASIS_WORDS[self.bits_basis]}"
        return f"{goal} {' and '.join(limits)}" + (" among exportable trials" if self.exportable_only else "")

    def flags(self) -> list[str]:
        """The ``autoquant ship`` flags of this rule."""
        out: list[str] = []
        if self.trial is not None:
            return ["--trial", self.trial]
        for flag, v in (("--max-bits", self.max_bits), ("--min-prefill-speedup", self.min_prefill_speedup),
                        ("--max-kl", self.max_kl), ("--max-ppl-increase", self.max_ppl_increase)):
            if v is not None:
                out += [flag, repr(float(v))]  # the shortest text that reads back as the same float
        if self.max_bits is not None and self.bits_basis != "all-layers":
            out += ["--bits-basis", self.bits_basis]
        return out + (["--exportable-only"] if self.exportable_only else [])


@dataclass
class Pick:
    """A rule's winner (a trials row), the runner-up (or None) and the candidates it was chosen among."""

    rule: ShipRule
    winner: pd.Series
    runner_up: pd.Series | None
    candidates: int

    def line(self) -> str:
        """One line: who won, under which rule, with which numbers, and the runner-up."""
        w, r = self.winner, self.runner_up
        text = f"{w['trial_id']} ({w['scheme']}): {self.rule.describe()}: {numbers(w)}"
        if self.rule.trial is not None:
            return text
        if r is None:
            return text + f"; the only one of {self.candidates} trial(s) that qualifies"
        tie_note = ""
        if _objective_value(w, self.rule) == _objective_value(r, self.rule):
            other = "fewer bits" if self.rule.objective == "kl" else "lower KL"
            tie_note = f" (tied on {'KL' if self.rule.objective == 'kl' else 'bits'}: broken by {other}, then trial id)"
        return text + f"; runner-up {r['trial_id']}: {numbers(r)}{tie_note}"


def ppl_increase(row: pd.Series) -> float:
    """Perplexity above the unquantized model's, in percent (NaN when not evaluated)."""
    ppl, ref = row.get("perplexity"), row.get("reference_perplexity")
    if ppl is None or ref is None or pd.isna(ppl) or pd.isna(ref) or not ref:
        return math.nan
    return (float(ppl) / float(ref) - 1.0) * 100.0


def numbers(row: pd.Series) -> str:
    """A trial's numbers as a rule judges them: KL, perplexity change, both bits bases, speed, exportability."""
    parts = []
    if _ok(row.get("kl_mean")):
        parts.append(f"KL {row['kl_mean']:.4g}")
    inc = ppl_increase(row)
    if not math.isnan(inc):
        parts.append(f"ppl {inc:+.3g}%")
    budget, every = row.get("effective_bits_achieved"), row.get("effective_bits_all_layers")
    parts.append(f"{_fmt(budget)} bits budget basis / {_fmt(every)} over all LM Linears")
    if _ok(row.get("prefill_vs_bf16")):
        parts.append(f"prefill {row['prefill_vs_bf16']:.3g}x BF16")
    parts.append("exportable" if _ok(row.get("exportable")) and bool(row.get("exportable")) else "NOT exportable")
    return ", ".join(parts)


def candidates(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials a rule may pick: finished AutoQuant trials with a manifest (no control, no failed trial)."""
    df = trials
    if "is_control" in df:
        df = df[~df["is_control"].fillna(False).astype(bool)]
    if "status" in df:
        df = df[df["status"].fillna("ok") == "ok"]
    if "manifest_path" in df:
        df = df[df["manifest_path"].notna()]
    df = df.copy()
    df["exportable"] = df["exportable"].map(lambda v: v is True or v == 1.0) if "exportable" in df else False
    return df.reset_index(drop=True)


def pick(trials: pd.DataFrame, rule: ShipRule) -> Pick:
    """The rule's winner among ``trials`` (a trials-table frame), or UserError naming the nearest trial that can be
    shipped when no trial satisfies the rule or the winner cannot be exported."""
    pool = candidates(trials)
    if pool.empty:
        raise UserError("no finished trial with a manifest among the sources; point at a sweep directory or runs")
    if rule.trial is not None:
        return _named(pool, rule)
    _check_columns(pool, rule)
    pool, fits = _fits(pool, rule)
    if fits.empty:
        near = _nearest(pool, rule)
        eligible = int(pool["exportable"].sum()) if rule.exportable_only else len(pool)
        raise UserError(f"no {'exportable ' if rule.exportable_only else ''}trial of {eligible} satisfies "
                        f"'{rule.describe()}'; nearest: {near}")
    winner = fits.iloc[0]
    if not winner["exportable"]:
        ok = fits[fits["exportable"]]
        if ok.empty:
            alt = f"no exportable trial satisfies it; nearest exportable: {_nearest(pool, rule, exportable=True)}"
        else:
            alt = (f"the best exportable trial under this rule is {ok.iloc[0]['trial_id']} ({numbers(ok.iloc[0])}): "
                   "add --exportable-only, or --trial " + str(ok.iloc[0]["trial_id"]))
        raise UserError(f"the winner {winner['trial_id']} ({winner['scheme']}: {numbers(winner)}) cannot be "
                        f"exported (export does not take its {winner_formats(winner)}); {alt}")
    return Pick(rule, winner, fits.iloc[1] if len(fits) > 1 else None, len(pool))


def ranked(trials: pd.DataFrame, rule: ShipRule) -> pd.DataFrame:
    """Every candidate that satisfies ``rule`` (exportable or not, unless the rule says exportable only), best first."""
    return _fits(candidates(trials), rule)[1]


def _fits(pool: pd.DataFrame, rule: ShipRule) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pool with each trial's violation of the rule, the trials that satisfy it ranked best first)."""
    pool = pool.assign(_violation=[_violation(r, rule) for _, r in pool.iterrows()])
    eligible = pool[pool["exportable"]] if rule.exportable_only else pool
    return pool, _ranked(eligible[eligible["_violation"] == 0.0], rule)


def winner_formats(row: pd.Series) -> str:
    """The candidate formats of a trial, for a refusal."""
    return f"formats {row.get('quantization_formats')}"


def _ok(v: Any) -> bool:
    return v is not None and not pd.isna(v)


def _fmt(v: Any) -> str:
    return f"{float(v):.4g}" if _ok(v) else "-"


def _check_columns(pool: pd.DataFrame, rule: ShipRule) -> None:
    """Refuse a rule that needs numbers no trial has (evaluation, measurement)."""
    if (rule.objective == "kl" or rule.max_kl is not None) and not pool.get("kl_mean", pd.Series()).notna().any():
        raise UserError("no trial has evaluation metrics (kl_mean); run the sweep with --evaluate, or ship one "
                        "trial with --trial ID")
    if rule.max_ppl_increase is not None and not pool.apply(ppl_increase, axis=1).notna().any():
        raise UserError("no trial has a perplexity and its reference's; run the sweep with --evaluate")
    if rule.min_prefill_speedup is not None and not pool.get("prefill_vs_bf16", pd.Series()).notna().any():
        raise UserError("no trial was measured (prefill_vs_bf16); run the sweep with --measure on GPUs, or use "
                        "--max-bits")


def _excess(value: Any, limit: float, upper: bool) -> float:
    """How far ``value`` is past ``limit`` relative to it (0 when within, inf when unknown)."""
    if value is None or pd.isna(value):
        return math.inf
    v, scale = float(value), max(abs(limit), 1e-12)
    over = (v - limit) / scale if upper else (limit - v) / scale
    return 0.0 if over <= SLACK else over


def _violation(row: pd.Series, rule: ShipRule) -> float:
    """Summed relative excess over the rule's limits (0: satisfies the rule)."""
    total = 0.0
    if rule.max_bits is not None:
        total += _excess(row.get(rule.bits_column), rule.max_bits, upper=True)
    if rule.min_prefill_speedup is not None:
        total += _excess(row.get("prefill_vs_bf16"), rule.min_prefill_speedup, upper=False)
    if rule.max_kl is not None:
        total += _excess(row.get("kl_mean"), rule.max_kl, upper=True)
    if rule.max_ppl_increase is not None:
        inc = ppl_increase(row)
        # A percent limit can be 0: measure its excess in percentage points.
        total += math.inf if math.isnan(inc) else max(0.0, inc - rule.max_ppl_increase - SLACK)
    return total


def _objective_value(row: pd.Series, rule: ShipRule) -> float:
    v = row.get("kl_mean") if rule.objective == "kl" else row.get(rule.bits_column)
    return math.inf if v is None or pd.isna(v) else float(v)


def _ranked(df: pd.DataFrame, rule: ShipRule) -> pd.DataFrame:
    """Best first: the objective, then the other one (bits for KL, KL for bits), then trial id."""
    if df.empty:
        return df
    kl = df["kl_mean"].astype(float).fillna(math.inf) if "kl_mean" in df else pd.Series(math.inf, index=df.index)
    bits = df[rule.bits_column].astype(float).fillna(math.inf)
    keys = (kl, bits) if rule.objective == "kl" else (bits, kl)
    order = df.assign(_k1=keys[0], _k2=keys[1]).sort_values(["_k1", "_k2", "trial_id"], kind="stable")
    return order.drop(columns=["_k1", "_k2"])


def _nearest(pool: pd.DataFrame, rule: ShipRule, exportable: bool = True) -> str:
    """The trial closest to satisfying the rule (exportable ones first), with its numbers."""
    ok = pool[pool["exportable"]] if exportable else pool
    if ok.empty:
        return "none of the trials can be exported (see `autoquant export`)"
    best = _ranked(ok[ok["_violation"] == ok["_violation"].min()], rule).iloc[0]
    return f"{best['trial_id']} ({numbers(best)})"


def _named(pool: pd.DataFrame, rule: ShipRule) -> Pick:
    """``--trial``: an exact trial id, else the one trial whose id contains it."""
    ref = str(rule.trial)
    hit = pool[pool["trial_id"] == ref]
    if hit.empty:
        hit = pool[pool["trial_id"].str.contains(ref, regex=False)]
    if hit.empty:
        raise UserError(f"no trial {ref!r} among {len(pool)} trials (e.g. {pool['trial_id'].iloc[0]}); "
                        "analysis.md and summary.md list their ids")
    if len(hit) > 1:
        raise UserError(f"{ref!r} matches {len(hit)} trials ({', '.join(hit['trial_id'].head(3))}, ...); "
                        "give more of the id")
    row = hit.iloc[0]
    if not row["exportable"]:
        ok = pool[pool["exportable"]]
        if ok.empty:
            near = "none of the trials can be exported"
        else:
            # Nearest: the exportable trial closest in bits over all LM Linears, then KL.
            dist = (ok["effective_bits_all_layers"].astype(float) - float(row["effective_bits_all_layers"])).abs()
            near_row = ok.assign(_d=dist).sort_values(["_d", "trial_id"]).iloc[0]
            near = f"nearest exportable: {near_row['trial_id']} ({numbers(near_row)})"
        raise UserError(f"trial {row['trial_id']} cannot be exported (export does not take its "
                        f"{winner_formats(row)}); {near}")
    return Pick(dataclasses.replace(rule, trial=str(row["trial_id"])), row, None, len(pool))


@dataclass(frozen=True)
class StandardRule:
    """A rule analysis.md offers, in words, with the numbers it was built from."""

    title: str
    rule: ShipRule


def round_limit(x: float, upper: bool = True, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits, rounded outwards (up for an upper limit), so the printed limit admits
    the trial it was read from and the command runs exactly the rule analysis.md judged."""
    if x == 0 or not math.isfinite(x):
        return x
    exp = math.floor(math.log10(abs(x))) - digits + 1
    scaled = x / 10.0**exp
    mant = math.ceil(scaled - 1e-9) if upper else math.floor(scaled + 1e-9)  # 1.234 stays 1.234, not 1.235
    limit = float(f"{mant}e{exp}")
    if (limit < x) if upper else (limit > x):  # the 1e-9 slack (or the division) crossed x: one step further out
        limit = float(f"{mant + (1 if upper else -1)}e{exp}")
    return limit


def standard_rules(trials: pd.DataFrame) -> list[StandardRule]:
    """The rules analysis.md names a trial for: matching the uniform FP8 control's KL with fewer bits, beating its KL
    at its bits, perplexity within 1% of the unquantized model, and (when measured) prefill as fast as uniform FP8.
    Only the rules the trials have numbers for."""
    from auto_quantize_model.analysis.summaries import split_controls

    controls, searched = split_controls(trials)
    out = []
    ctl = controls.dropna(subset=["kl_mean"]) if "kl_mean" in controls else controls.iloc[0:0]
    if not ctl.empty:
        c = ctl.iloc[0]
        out.append(StandardRule(f"As accurate as uniform FP8 PTQ, fewest bits (KL <= the control's "
                                f"{c['kl_mean']:.4g})", ShipRule(max_kl=round_limit(float(c["kl_mean"])))))
        if _ok(c.get("effective_bits_all_layers")):
            bits = float(c["effective_bits_all_layers"])
            out.append(StandardRule(f"Uniform FP8 PTQ's size, lowest KL (<= its {bits:.4g} bits over all LM Linears)",
                                    ShipRule(max_bits=round_limit(bits))))
    if not searched.empty and searched.apply(ppl_increase, axis=1).notna().any():
        out.append(StandardRule("Perplexity within 1% of the unquantized model, fewest bits",
                                ShipRule(max_ppl_increase=1.0)))
    if {"prefill_vs_bf16", "prefill_vs_uniform_fp8"} <= set(searched) and searched["prefill_vs_bf16"].notna().any():
        fp8 = (searched["prefill_vs_bf16"] / searched["prefill_vs_uniform_fp8"]).median()
        if _ok(fp8):
            out.append(StandardRule(f"Prefill as fast as uniform FP8 ({fp8:.3g}x BF16, measured), lowest KL",
                                    ShipRule(min_prefill_speedup=round_limit(float(fp8), upper=False))))
    return out
