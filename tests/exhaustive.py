"""Exhaustive enumeration of every layer choice, the reference the exact selection is tested against.

Vectorised with numpy (float totals of every choice, built group by group as outer sums), then exact: every
feasible choice whose float value is within a rounding bound of the float optimum is re-scored in Python integers
(scores are dyadic rationals), and the best is taken under the selection's tie rule (lower value, then lower cost,
then the lexicographically smallest index vector; ``minimax`` also prefers the lower summed score before the index
vector, as ``selection.py``'s threshold rule does). Costs must be integers below 2**53 (they are: weight counts
times bits / 16), so feasibility is exact in float64.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from auto_quantize_model.autoquant.selection import Problem

TAIL = 1 << 20  # choices of the vectorised tail; head groups are looped


def _ints(values: list[float]) -> list[int]:
    ratios = [float(v).as_integer_ratio() for v in values]
    shift = max(d.bit_length() - 1 for _, d in ratios)
    return [n << (shift - (d.bit_length() - 1)) for n, d in ratios]


def _outer(rows: list[np.ndarray], combine: np.ufunc) -> np.ndarray:
    """Totals of every index vector over ``rows``, flat in lexicographic order (first group most significant)."""
    out = np.zeros(1)
    for r in rows:
        out = combine.outer(out, r).ravel()
    return out


def exhaustive(p: Problem, objective: str = "min-sum") -> tuple[int, ...] | None:
    """The best choice by enumeration (None: none fits the cap)."""
    assert all(float(c).is_integer() for row in p.costs for c in row)
    sizes = [len(s) for s in p.scores]
    split = len(sizes)
    while split > 0 and math.prod(sizes[split - 1:]) <= TAIL:
        split -= 1
    combine = np.add if objective == "min-sum" else np.maximum
    scores = [np.array(row, dtype=np.float64) for row in p.scores]
    costs = [np.array(row, dtype=np.float64) for row in p.costs]
    ts, tc = _outer(scores[split:], combine), _outer(costs[split:], np.add)
    feasible_tail = tc <= p.cap
    heads = list(itertools.product(*[range(n) for n in sizes[:split]]))

    def head_totals(h: tuple[int, ...]) -> tuple[float, float]:
        vals = [p.scores[g][j] for g, j in enumerate(h)]
        return (sum(vals) if objective == "min-sum" else max(vals, default=0.0),
                sum(p.costs[g][j] for g, j in enumerate(h)))

    bound = 1e-12 * sum(max(abs(x) for x in row if x != math.inf) for row in p.scores) + 1e-300
    best = math.inf
    for h in heads:
        hs, hc = head_totals(h)
        ok = feasible_tail if hc == 0 else tc + hc <= p.cap
        if ok.any():
            best = min(best, float(combine(ts[ok], hs).min()))
    if best == math.inf:
        return None
    near: list[tuple[int, ...]] = []
    for h in heads:
        hs, hc = head_totals(h)
        idx = np.nonzero((tc + hc <= p.cap) & (combine(ts, hs) <= best + 2 * bound))[0]
        if len(idx):
            tail_rows = np.stack(np.unravel_index(idx, sizes[split:]), axis=1) if split < len(sizes) else [[]]
            near.extend(h + tuple(r) for r in np.asarray(tail_rows).tolist())
    exact = _ints([0.0 if s == math.inf else s for row in p.scores for s in row])
    at, k = [], 0
    for row in p.scores:
        at.append(exact[k:k + len(row)])
        k += len(row)

    def key(ch: tuple[int, ...]) -> tuple:
        chosen = [at[g][j] for g, j in enumerate(ch)]
        cost = sum(int(p.costs[g][j]) for g, j in enumerate(ch))
        if objective == "min-sum":
            return (sum(chosen), cost, ch)
        return (max(chosen, default=0), cost, sum(chosen), ch)

    finite = [ch for ch in near if all(p.scores[g][j] != math.inf for g, j in enumerate(ch))]
    return min(finite, key=key)
