"""The exact layer selection: which candidate format each search group takes, solved without tolerances.

ModelOpt 0.47 picks each group's format with PuLP/CBC (``LPS`` in ``modelopt/torch/opt/searcher.py``). CBC's
absolute tolerances (about 1e-6) are the size of AutoQuant scores (the tiny demo model: 1e-7 to 1e-5), so it can
report "Optimal" for a choice far from optimal, and multiplying every score by a constant can change its choice.
This module (the problem, the result, the comparison) and ``knapsack.py`` (the integer algorithms) solve the same
problem exactly, with no torch and no ModelOpt:

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

from auto_quantize_model.autoquant.knapsack import Ints, integers, known, solve_min_sum, solve_minimax

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
# about a second of work. Real score vectors need 10**2-10**4 (tests/test_selection.py, docs/benchmarks.md); only
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
    def exact(self) -> Ints:
        """The problem in exact integers (computed once)."""
        return integers(self.scores, self.costs, self.cap)

    def finite(self, choice: Sequence[int]) -> bool:
        """Whether every chosen candidate has a finite score (NaN and +inf scores are never chosen here)."""
        return all(math.isfinite(self.scores[g][j]) for g, j in enumerate(choice))

    def total(self, choice: Sequence[int]) -> tuple[Fraction, Fraction]:
        """Exact (summed score, summed cost) of a :meth:`finite` ``choice``."""
        e = self.exact
        score = sum(known(e.score[g][j]) for g, j in enumerate(choice))
        return Fraction(score, 1 << e.score_shift), Fraction(sum(e.cost[g][j] for g, j in enumerate(choice)),
                                                              1 << e.cost_shift)

    def value(self, choice: Sequence[int], objective: Objective) -> Fraction:
        """The exact value of ``objective`` for a :meth:`finite` ``choice``: the summed score, or the largest one."""
        e = self.exact
        chosen = [known(e.score[g][j]) for g, j in enumerate(choice)]
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
        choice, proven, gap_units, nodes = solve_min_sum(ints, max_nodes)
    else:
        choice, nodes = solve_minimax(ints)
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
