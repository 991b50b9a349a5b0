"""The exact layer selection: which candidate format each search group takes, solved without tolerances.

ModelOpt 0.47 picks each group's format with PuLP/CBC (``LPS`` in ``modelopt/torch/opt/searcher.py``). CBC's
absolute tolerances (about 1e-6) are the size of AutoQuant scores (the tiny demo model: 1e-7 to 1e-5), so it can
report "Optimal" for a choice far from optimal, and multiplying every score by a constant can change its choice.
This module solves the same problem exactly, with no torch and no ModelOpt:

- **min-sum** (ModelOpt's ``gradient`` method): minimise the summed score of the chosen candidates subject to their
  summed cost ``<= cap``, a multiple-choice knapsack. Every float is a dyadic rational, so scores and costs become
  exact integers over one common power of two (Python ints are unbounded) and nothing is ever rounded. The solve
  is a dynamic program over (cost, score) states that keeps only Pareto-optimal states and drops every state whose
  Lagrangian bound (the LP relaxation's, with the critical efficiency of the LP as multiplier) cannot reach the
  greedy incumbent; groups whose alternatives all fail that bound are fixed before the program starts. The answer
  is proven optimal (gap 0) unless ``max_nodes`` is exceeded, then the incumbent is returned with its certified
  gap to the LP bound.
- **minimax** (ModelOpt's ``kl_div`` method, a threshold rule): minimise the largest chosen score; at that
  threshold every group takes its cheapest candidate whose score is within it. ModelOpt finds the threshold by
  100 float bisection steps and keeps the last step's selection, which may be just below the threshold (then
  over budget); here the threshold is the smallest score value at which the rule fits the cap, found exactly.

Ties (one rule for both objectives, so a result never depends on the order the solver met its candidates): among
choices of exactly equal total score the lower total cost wins (more compression for the same harm); among those
the one whose candidate-index vector, read in group order, is lexicographically smallest (the earlier group takes
the more aggressive format; ModelOpt orders each group's candidates most aggressive first, NONE last).

Scores that are NaN or +inf mark candidates that are never chosen (every group has a finite one: NONE scores 0).

Scale: multiplying every score by a power of two leaves the exact integers' ratios and therefore the choice
unchanged; any other positive constant changes the choice only where float rounding turns an exact tie into a
non-tie or back.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

SOLVER = "auto_quantize_model.selection"
SOLVER_VERSION = "1"
OBJECTIVES = {
    "min-sum": "minimise the summed score of the chosen candidates subject to summed cost <= cap",
    "minimax": "minimise the largest chosen score; at that threshold every group takes its cheapest candidate "
               "within it (ModelOpt's kl_div rule, threshold found exactly)",
}
TIE_RULE = ("equal total score: lower total cost; then the lexicographically smallest candidate-index vector in "
            "group order (earlier groups take the more aggressive format)")
# States the program may generate before it gives up on a proof and returns its incumbent with the certified gap:
# about a second of work. Real score vectors need 10**3-10**4 (tests/test_selection.py, docs/benchmarks.md); only
# contrived ones (every score exactly proportional to its cost, so that every choice of equal cost ties) reach it.
MAX_NODES = 1_000_000
Objective = Literal["min-sum", "minimax"]


class InfeasibleBudget(ValueError):
    """Even every group at its cheapest candidate costs more than the cap."""

    def __init__(self, lowest_bits: float, cap: float) -> None:
        # ModelOpt's own wording (algorithms.py ``_verify_resolved_constraint``), so one handler reads both.
        super().__init__(f"The effective_bits target is infeasible: cap {cap!r}. The minimum achievable effective "
                         f"bits is {lowest_bits:.4f}.")
        self.lowest_bits = lowest_bits


@dataclass(frozen=True)
class Problem:
    """Groups (in ModelOpt's ``candidate_stats`` order) with their candidates' scores and costs, and the cap.

    ``cap`` is ModelOpt's ``max_weight_size`` (``cost_denominator * effective_bits / 16``, a float);
    ``denominator`` turns a total cost into effective bits (``16 * cost / denominator``).
    """

    names: tuple[str, ...]
    scores: tuple[tuple[float, ...], ...]
    costs: tuple[tuple[float, ...], ...]
    cap: float
    denominator: float

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.scores) == len(self.costs)):
            raise ValueError("names, scores and costs need one entry per group")
        for name, s, c in zip(self.names, self.scores, self.costs):
            if not s or len(s) != len(c):
                raise ValueError(f"group {name}: needs one score and one cost per candidate")
            if any(x == -math.inf for x in s):
                raise ValueError(f"group {name}: a score is -inf")
            if not any(math.isfinite(x) for x in s):
                raise ValueError(f"group {name}: no candidate has a finite score")
            if any(not math.isfinite(x) or x < 0 for x in c):
                raise ValueError(f"group {name}: costs must be finite and >= 0")
        if not math.isfinite(self.cap) or not math.isfinite(self.denominator) or self.denominator <= 0:
            raise ValueError("cap must be finite and the denominator finite and > 0")

    @classmethod
    def from_candidate_stats(cls, stats: dict[str, dict], cap: float, denominator: float) -> Problem:
        """From ModelOpt's ``candidate_stats`` (``formats``, ``scores``, ``costs`` per group)."""
        return cls(tuple(stats), tuple(tuple(float(x) for x in s["scores"]) for s in stats.values()),
                   tuple(tuple(float(x) for x in s["costs"]) for s in stats.values()), float(cap), float(denominator))

    @functools.cached_property
    def exact(self) -> _Ints:
        """The problem in exact integers (computed once)."""
        return _integers(self)

    def finite(self, choice: Sequence[int]) -> bool:
        """Whether every chosen candidate has a finite score (NaN and +inf scores are never chosen here)."""
        return all(math.isfinite(self.scores[g][j]) for g, j in enumerate(choice))

    def total(self, choice: Sequence[int]) -> tuple[Fraction, Fraction]:
        """Exact (summed score, summed cost) of a :meth:`finite` ``choice``."""
        e = self.exact
        score = sum(_known(e.score[g][j]) for g, j in enumerate(choice))
        return Fraction(score, 1 << e.score_shift), Fraction(sum(e.cost[g][j] for g, j in enumerate(choice)),
                                                              1 << e.cost_shift)

    def value(self, choice: Sequence[int], objective: Objective) -> Fraction:
        """The exact value of ``objective`` for a :meth:`finite` ``choice``: the summed score, or the largest one."""
        e = self.exact
        chosen = [_known(e.score[g][j]) for g, j in enumerate(choice)]
        return Fraction(sum(chosen) if objective == "min-sum" else max(chosen, default=0), 1 << e.score_shift)

    def lowest_bits(self) -> float:
        """Effective bits with every group at its cheapest candidate (of those with a finite score)."""
        cheapest = Fraction(sum(cs[0][0] for cs in self.exact.cands), 1 << self.exact.cost_shift)
        return 16.0 * float(cheapest) / self.denominator


@dataclass(frozen=True)
class Selection:
    """One solved selection."""

    choice: tuple[int, ...]  # chosen candidate index per group, in the problem's group order
    score: float  # summed score (the exact sum, rounded once)
    cost: float  # summed cost
    effective_bits: float  # 16 * cost / denominator
    objective: Objective
    optimal: bool  # proven optimal
    gap: float  # certified absolute gap to the optimum (0 when proven); in score units
    relative_gap: float  # gap / |score| (0 when the gap is 0)
    nodes: int  # states the program generated (0: decided without one)
    seconds: float
    solver: str = SOLVER
    version: str = SOLVER_VERSION


@dataclass(frozen=True)
class ModelOptChoice:
    """ModelOpt's own choice for the same problem, computed the way ModelOpt computes it, for comparison."""

    choice: tuple[int, ...] | None  # None: it returned no selection
    status: str  # CBC's status (gradient) or "satisfied"/"not satisfied" (kl_div bisection)
    seconds: float
    error: str | None = None  # why there is no choice (the solver raised)


@dataclass(frozen=True)
class Comparison:
    """How ModelOpt's choice compares with the exact one."""

    status: str
    seconds: float
    score: float | None  # ModelOpt's summed score
    effective_bits: float | None
    within_budget: bool | None
    differs: bool | None  # None: no ModelOpt choice
    differing_groups: tuple[str, ...] = ()
    # ModelOpt's objective value minus the exact one (min-sum: summed score; minimax: largest chosen score); >= 0
    # whenever ModelOpt's choice is within the budget.
    score_gap: float | None = None
    relative_score_gap: float | None = None  # score_gap / the exact objective value (None when that is 0)
    objective_value: float | None = None  # ModelOpt's objective value
    error: str | None = None
    choice: tuple[int, ...] | None = None  # ModelOpt's candidate index per group


@dataclass(frozen=True)
class SolveRecord:
    """The exact selection, and ModelOpt's beside it (None when the comparison was not run)."""

    problem: Problem
    selection: Selection
    modelopt: Comparison | None = field(default=None)

    def within_budget(self) -> bool:
        """The exact summed cost of the selection is within the cap (checked again, without rounding)."""
        return self.problem.total(self.selection.choice)[1] <= Fraction(self.problem.cap)


# --- exact integers ------------------------------------------------------------------------------------------------


def _to_ints(values: Sequence[float]) -> tuple[list[int], int]:
    """Finite floats as integers over one common power of two, and that power's exponent ``e``:
    ``value == integer / 2**e`` exactly (every float is a dyadic rational)."""
    ratios = [float(v).as_integer_ratio() for v in values]
    shift = max((d.bit_length() - 1 for _, d in ratios), default=0)
    return [n << (shift - (d.bit_length() - 1)) for n, d in ratios], shift


@dataclass
class _Ints:
    """The problem in exact integers: ``score[g][j] / 2**score_shift`` and ``cost[g][j] / 2**cost_shift`` are the
    floats exactly (``None``: a NaN or +inf score, never chosen); ``cands[g]`` = the undominated (cost, score,
    index), cost ascending."""

    score: list[list[int | None]]
    cost: list[list[int]]
    cap: int
    score_shift: int
    cost_shift: int
    cands: list[list[tuple[int, int, int]]]


def _known(score: int | None) -> int:
    if score is None:
        raise ValueError("a chosen candidate's score is NaN or +inf")
    return score


def _integers(p: Problem) -> _Ints:
    flat_s, s_shift = _to_ints([s for row in p.scores for s in row if math.isfinite(s)])
    flat_c, c_shift = _to_ints([c for row in p.costs for c in row] + [max(p.cap, 0.0)])
    it_s, it_c = iter(flat_s), iter(flat_c)
    score = [[next(it_s) if math.isfinite(x) else None for x in row] for row in p.scores]
    cost = [[next(it_c) for _ in row] for row in p.costs]
    cands = [_undominated([(c, s, j) for j, (c, s) in enumerate(zip(cs, ss)) if s is not None])
             for cs, ss in zip(cost, score)]
    return _Ints(score, cost, next(it_c) if p.cap >= 0 else -1, s_shift, c_shift, cands)


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


def _solve_min_sum(p: Problem, ints: _Ints, max_nodes: int) -> tuple[list[int], bool, Fraction, int]:
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


def _threshold_choice(ints: _Ints, t: int) -> tuple[list[int], int] | None:
    """Each group's cheapest candidate with score <= t (undominated lists are cost-ascending: the first one)."""
    choice, cost = [], 0
    for cs in ints.cands:
        pick = next(((c, j) for c, s, j in cs if s <= t), None)
        if pick is None:
            return None
        cost += pick[0]
        choice.append(pick[1])
    return choice, cost


def _solve_minimax(ints: _Ints) -> tuple[list[int], int]:
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


# --- entry point ---------------------------------------------------------------------------------------------------


def solve(problem: Problem, objective: Objective = "min-sum", *, max_nodes: int = MAX_NODES) -> Selection:
    """The exact selection for ``problem``; :class:`InfeasibleBudget` if even the cheapest choice exceeds the cap."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    t0 = time.perf_counter()
    ints = problem.exact
    if sum(cs[0][0] for cs in ints.cands) > ints.cap:
        raise InfeasibleBudget(problem.lowest_bits(), problem.cap)
    if objective == "min-sum":
        choice, proven, gap_units, nodes = _solve_min_sum(problem, ints, max_nodes)
    else:
        choice, nodes = _solve_minimax(ints)
        proven, gap_units = True, Fraction(0)
    score, cost = problem.total(choice)
    value = problem.value(choice, objective)
    gap = gap_units / (1 << ints.score_shift)
    return Selection(
        choice=tuple(choice), score=float(score), cost=float(cost),
        effective_bits=16.0 * float(cost) / problem.denominator, objective=objective, optimal=proven,
        gap=float(gap), relative_gap=float(gap / abs(value)) if gap and value else 0.0, nodes=nodes,
        seconds=time.perf_counter() - t0)


def compare(problem: Problem, selection: Selection, theirs: ModelOptChoice) -> Comparison:
    """ModelOpt's choice against the exact one: its score and bits, the groups where it differs, its objective gap."""
    if theirs.choice is None:
        return Comparison(theirs.status, theirs.seconds, None, None, None, None, error=theirs.error)
    differing = tuple(n for n, a, b in zip(problem.names, theirs.choice, selection.choice) if a != b)
    if not problem.finite(theirs.choice):
        return Comparison(theirs.status, theirs.seconds, None, None, None, bool(differing), differing,
                          error="it chose a candidate whose score is NaN or +inf", choice=theirs.choice)
    score, cost = problem.total(theirs.choice)
    ours = problem.value(selection.choice, selection.objective)
    value = problem.value(theirs.choice, selection.objective)
    return Comparison(
        status=theirs.status, seconds=theirs.seconds, score=float(score),
        effective_bits=16.0 * float(cost) / problem.denominator, within_budget=cost <= Fraction(problem.cap),
        differs=bool(differing), differing_groups=differing, score_gap=float(value - ours),
        relative_score_gap=float((value - ours) / ours) if ours else None, objective_value=float(value),
        choice=theirs.choice)
