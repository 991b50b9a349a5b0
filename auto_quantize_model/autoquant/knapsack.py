"""The exact integer algorithms behind ``selection.py``: scores and costs as exact integers, the multiple-choice
knapsack (min-sum) solved by a bounded Pareto program, and the threshold rule (minimax) at its exact threshold.

Nothing here rounds: every float is a dyadic rational and becomes an integer over one common power of two.
Candidates are ``(cost, score, index)`` triples; an index vector is encoded as one integer whose digits (base: the
largest candidate count) are the indices in group order, so that comparing codes compares index vectors
lexicographically, the last tie rule (``selection.TIE_RULE``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

# --- exact integers ------------------------------------------------------------------------------------------------


def to_ints(values: Sequence[float]) -> tuple[list[int], int]:
    """Finite floats as integers over one common power of two, and that power's exponent ``e``:
    ``value == integer / 2**e`` exactly (every float is a dyadic rational)."""
    ratios = [float(v).as_integer_ratio() for v in values]
    shift = max((d.bit_length() - 1 for _, d in ratios), default=0)
    return [n << (shift - (d.bit_length() - 1)) for n, d in ratios], shift


@dataclass
class Ints:
    """The problem in exact integers: ``score[g][j] / 2**score_shift`` and ``cost[g][j] / 2**cost_shift`` are the
    floats exactly (``None``: a NaN or +inf score, never chosen); ``cands[g]`` = the undominated (cost, score,
    index), cost ascending."""

    score: list[list[int | None]]
    cost: list[list[int]]
    cap: int
    score_shift: int
    cost_shift: int
    cands: list[list[tuple[int, int, int]]]


def known(score: int | None) -> int:
    if score is None:
        raise ValueError("a chosen candidate's score is NaN or +inf")
    return score


def integers(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], cap: float) -> Ints:
    """Scores, costs and cap as exact integers, with each group's undominated candidates."""
    flat_s, s_shift = to_ints([s for row in scores for s in row if math.isfinite(s)])
    flat_c, c_shift = to_ints([c for row in costs for c in row] + [max(cap, 0.0)])
    it_s, it_c = iter(flat_s), iter(flat_c)
    score = [[next(it_s) if math.isfinite(x) else None for x in row] for row in scores]
    cost = [[next(it_c) for _ in row] for row in costs]
    cands = [_undominated([(c, s, j) for j, (c, s) in enumerate(zip(cs, ss)) if s is not None])
             for cs, ss in zip(cost, score)]
    return Ints(score, cost, next(it_c) if cap >= 0 else -1, s_shift, c_shift, cands)


def _undominated(items: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Candidates no other beats under the tie rule: cost ascending, score strictly descending.

    A candidate with cost >= and score >= another's (index larger on a full tie) is never part of a best choice.
    """
    out: list[tuple[int, int, int]] = []
    for c, s, j in sorted(items):
        if not out or s < out[-1][1]:
            out.append((c, s, j))
    return out


# --- min-sum: LP relaxation, incumbent, bounded Pareto program -----------------------------------------------------


def _hull(cands: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Lower convex hull of a group's (cost, score) points: the LP relaxation's path, efficiency decreasing."""
    hull: list[tuple[int, int, int]] = []
    for pt in cands:
        while len(hull) >= 2:
            (c0, s0, _), (c1, s1, _) = hull[-2], hull[-1]
            if (s0 - s1) * (pt[0] - c1) <= (s1 - pt[1]) * (c1 - c0):  # not strictly convex: drop the middle
                hull.pop()
            else:
                break
        hull.append(pt)
    return hull


def solve_min_sum(ints: Ints, max_nodes: int) -> tuple[list[int], bool, Fraction, int]:
    """(candidate index per group, proven, certified gap in integer score units, states generated)."""
    cands, cap = ints.cands, ints.cap
    n = len(cands)
    hulls = [_hull(c) for c in cands]
    pos = [0] * n  # position on each group's hull
    rem = cap - sum(h[0][0] for h in hulls)
    # Upgrades by efficiency (score saved per cost), best first. The key is the efficiency's floor at 128 fraction
    # bits: exact enough for the bound (any multiplier gives a valid bound) and it keeps each group's hull order.
    ups = sorted((-(((h[i][1] - h[i + 1][1]) << 128) // (h[i + 1][0] - h[i][0])), g, i)
                 for g, h in enumerate(hulls) for i in range(len(h) - 1))
    critical = None
    for k, (_, g, i) in enumerate(ups):
        dc = hulls[g][i + 1][0] - hulls[g][i][0]
        if dc > rem:
            critical = k
            break
        rem -= dc
        pos[g] = i + 1
    if critical is None:  # every group at its lowest score fits: nothing to trade
        return [hulls[g][pos[g]][2] for g in range(n)], True, Fraction(0), 0

    _, gc, ic = ups[critical]
    q = hulls[gc][ic + 1][0] - hulls[gc][ic][0]  # multiplier lambda = p / q (critical efficiency)
    pn = hulls[gc][ic][1] - hulls[gc][ic + 1][1]
    # Greedy incumbent: the LP's integer part, then every later upgrade that still fits in order.
    blocked = {gc}
    for _, g, i in ups[critical + 1:]:
        if g in blocked or pos[g] != i:
            blocked.add(g)
            continue
        dc = hulls[g][i + 1][0] - hulls[g][i][0]
        if dc <= rem:
            rem -= dc
            pos[g] = i + 1
        else:
            blocked.add(g)
    incumbent = [hulls[g][pos[g]][2] for g in range(n)]
    s_inc = sum(hulls[g][pos[g]][1] for g in range(n))
    vals = [[(c, s, j, q * s + pn * c) for c, s, j in cs] for cs in cands]
    minv = [min(v[3] for v in vs) for vs in vals]
    lp_q = sum(minv) - pn * cap  # q * (the LP bound)
    full = q * s_inc - lp_q  # >= 0: the incumbent's distance to the bound, in q-scaled units
    width = max(j for cs in cands for _, _, j in cs) + 1
    # Optimistic rounds: first ask for a choice within a small part of the incumbent's gap; a choice found within it
    # is optimal (every better one would have survived the pruning), else widen. The last round is the full gap.
    nodes, slack = 0, full >> 8
    while True:
        slack = min(full, slack)
        found, generated, too_many = _program(vals, minv, cap, lp_q + pn * cap + slack, width, max_nodes - nodes)
        nodes += generated
        if too_many:
            return incumbent, False, Fraction(full, q), nodes
        if found is None and slack >= full:  # the incumbent survives the full round
            raise AssertionError("the exact selection lost its incumbent")
        if found is not None:
            if q * found[1] - lp_q <= slack:
                return _decode(found[2], n, width), True, Fraction(0), nodes
            if q * found[1] - lp_q < full:  # a better incumbent than the greedy one
                incumbent, full = _decode(found[2], n, width), q * found[1] - lp_q
        slack = max(4 * slack, 1)


def _program(vals: list[list[tuple[int, int, int, int]]], minv: list[int], cap: int, limit: int, width: int,
             max_nodes: int) -> tuple[tuple[int, int, int, int] | None, int, bool]:
    """The bounded Pareto program: the best (cost, score, code, V) among choices whose Lagrangian value
    ``V = q*score + p*cost`` can stay within ``limit``, states generated, and whether ``max_nodes`` stopped it.

    ``vals[g]`` = (cost, score, index, V) per undominated candidate. A state is dropped when it cannot fit the cap
    with the rest at their cheapest, when its V plus the rest's smallest V exceeds ``limit`` (then every completion
    scores above the limit's score), or when another state costs no more and scores no more.
    """
    n = len(vals)
    weight = [width ** (n - 1 - g) for g in range(n)]  # code: the index vector, lexicographic in group order
    slack = limit - sum(minv)
    # Reduced-cost fixing: an alternative whose own excess over its group's minimum V exceeds the slack is out.
    live = [[v for v in vs if v[3] - minv[g] <= slack] for g, vs in enumerate(vals)]
    fixed = [g for g in range(n) if len(live[g]) == 1]
    branch = sorted((g for g in range(n) if len(live[g]) > 1),
                    key=lambda g: (-sorted(v[3] - minv[g] for v in live[g])[1], g))
    rest_cost = [0] * (len(branch) + 1)
    rest_minv = [0] * (len(branch) + 1)
    for k in range(len(branch) - 1, -1, -1):
        g = branch[k]
        rest_cost[k] = rest_cost[k + 1] + min(v[0] for v in live[g])
        rest_minv[k] = rest_minv[k + 1] + minv[g]
    states = [(sum(live[g][0][0] for g in fixed), sum(live[g][0][1] for g in fixed),
               sum(live[g][0][2] * weight[g] for g in fixed), sum(live[g][0][3] for g in fixed))]
    if states[0][0] + rest_cost[0] > cap:
        return None, 0, False
    nodes = 0
    for k, g in enumerate(branch):
        room, vroom, w = cap - rest_cost[k + 1], limit - rest_minv[k + 1], weight[g]
        nxt = [(c + dc, s + ds, code + j * w, v + dv) for c, s, code, v in states for dc, ds, j, dv in live[g]
               if c + dc <= room and v + dv <= vroom]
        nodes += len(nxt)
        if nodes > max_nodes:
            return None, nodes, True
        nxt.sort()
        states = []
        for st in nxt:  # Pareto: cost ascending, keep only strictly lower scores (ties: the lowest code came first)
            if not states or st[1] < states[-1][1]:
                states.append(st)
    # Cost ascending with scores strictly descending: the last state has the lowest score.
    return (states[-1] if states else None), nodes, False


def _decode(code: int, n: int, width: int) -> list[int]:
    """The index vector of a code (digits base ``width``, group 0 most significant)."""
    out = []
    for _ in range(n):
        code, j = divmod(code, width)
        out.append(j)
    return out[::-1]


# --- minimax: the exact threshold ----------------------------------------------------------------------------------


def _threshold_choice(ints: Ints, t: int) -> tuple[list[int], int] | None:
    """Each group's cheapest candidate with score <= t (undominated lists are cost-ascending: the first one)."""
    choice, cost = [], 0
    for cs in ints.cands:
        pick = next(((c, j) for c, s, j in cs if s <= t), None)
        if pick is None:
            return None
        cost += pick[0]
        choice.append(pick[1])
    return choice, cost


def solve_minimax(ints: Ints) -> tuple[list[int], int]:
    """The smallest score value at which the threshold rule fits the cap, and its choice; (choice, probes)."""
    values = sorted({s for cs in ints.cands for _, s, _ in cs})
    lo, hi, probes = 0, len(values) - 1, 0
    best = None
    while lo <= hi:  # fits(t) is monotone in t: a larger threshold only admits cheaper candidates
        mid = (lo + hi) // 2
        probes += 1
        got = _threshold_choice(ints, values[mid])
        if got is not None and got[1] <= ints.cap:
            best, hi = got[0], mid - 1
        else:
            lo = mid + 1
    assert best is not None  # the caller checked that the cheapest choice fits
    return best, probes
