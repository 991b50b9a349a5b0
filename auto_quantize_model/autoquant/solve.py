"""Every solve goes through the exact selection (``selection.py``); ModelOpt's own choice is kept beside it.

Two ways in:

- :func:`exact_selection`, a context manager around ``mtq.auto_quantize``: for the duration of the call it
  substitutes the searchers' ``run_search_with_stats`` (ModelOpt 0.47 ``algorithms.py``: the gradient searcher's
  LPS/CBC solve, the kl_div searcher's threshold bisection) with the exact solve, so ModelOpt's ``run_search``
  activates the exact choice and then folds pre_quant_scale into the weights for SmoothQuant/AWQ formats as it
  always does. The originals are back when the block ends, also on error.
- :func:`solve_state` for a finished search state (the in-memory re-solve).

Both record a :class:`selection.SolveRecord` in ``search_state["best"]["selection"]`` (in memory only: ModelOpt
saves its checkpoint before it solves) with ModelOpt's own result computed the way ModelOpt computes it: its
original ``run_search_with_stats`` (LPS/CBC with its retry lower bounds, or the bisection) on the same
candidate stats and cap. That comparison costs ~20-110 ms per solve of the 3B's 145 groups on the 2-core CPU
machine (PuLP builds the model, CBC runs as a subprocess; docs/benchmarks.md), against ~1-10 ms for the exact solve.

The substitution is a class attribute for the duration of the block: another thread of the same process that
runs a ModelOpt search at that moment would get the exact solve too (this tool runs one search per process at a
time).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from auto_quantize_model.autoquant.selection import (
    OBJECTIVES,
    TIE_RULE,
    ModelOptChoice,
    Objective,
    Problem,
    SolveRecord,
    compare,
    solve,
)

log = logging.getLogger(__name__)

OBJECTIVE_OF_METHOD: dict[str, Objective] = {"gradient": "min-sum", "kl_div": "minimax"}
_PATCHED = "_auto_quantize_model_exact"
_lock = threading.RLock()
_depth = 0
_originals: dict[type, Any] = {}


def _searcher_classes() -> dict[str, type]:
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher, AutoQuantizeKLDivSearcher

    return {"gradient": AutoQuantizeGradientSearcher, "kl_div": AutoQuantizeKLDivSearcher}


def _original(cls: type) -> Any:
    """ModelOpt's own ``run_search_with_stats`` of ``cls`` (also while :func:`exact_selection` is active)."""
    fn = cls.__dict__["run_search_with_stats"]
    return _originals.get(cls, fn) if getattr(fn, _PATCHED, False) else fn


def denominator_of(stats: dict[str, dict[str, Any]], recorded: float | None = None) -> float:
    """ModelOpt's cost denominator: the recorded one, else the summed uncompressed costs (``_resolve_best_recipe``,
    ModelOpt 0.47 ``algorithms.py`` lines 2071-2078)."""
    return float(recorded or sum(s.get("uncompressed_cost", max(s["costs"])) for s in stats.values()))


def cap_of(denominator: float, effective_bits: float) -> float:
    """ModelOpt's ``max_weight_size`` for a budget: the same float operations as ``run_search`` and
    ``_resolve_best_recipe`` (``total_weight_size * (effective_bits / 16.0)``)."""
    return denominator * (effective_bits / 16.0)


def _modelopt_choice(searcher: Any, method: str, stats: dict[str, dict[str, Any]], cap: float) -> ModelOptChoice:
    """ModelOpt's original solve on ``searcher`` (its candidate stats and config), as indices per group."""
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "FAILED to find a solution" warning: the status says it
            info, satisfied = _original(_searcher_classes()[method])(searcher, cap, False)
        choice = tuple(stats[name]["formats"].index(info[name]["format"]) for name in stats)
    except Exception as exc:  # noqa: BLE001 - the comparison never stops a run; its failure is recorded
        return ModelOptChoice(None, "error", time.perf_counter() - t, f"{exc.__class__.__name__}: {exc}")
    status = getattr(searcher, "status", None) if method == "gradient" else None
    return ModelOptChoice(choice, str(status or ("satisfied" if satisfied else "not satisfied")),
                          time.perf_counter() - t)


def _offline_searcher(state: dict[str, Any]) -> Any:
    """A searcher holding a finished state's stats and cost model, set up as ``_resolve_best_recipe`` does (ModelOpt
    0.47 ``algorithms.py`` lines 2080-2104), for ModelOpt's own solve of a re-solve."""
    from modelopt.torch.quantization.algorithms import ACTIVE_MOE_EXPERT_RATIO_KEY, COST_MODEL_ACTIVE_MOE

    searcher = _searcher_classes()[state["method"]]()
    searcher.candidate_stats = state["candidate_stats"]
    searcher.cost_model = state.get("cost_model", "weight")
    searcher.cost = state.get("cost", {})
    searcher.active_moe_expert_ratio = state.get("active_moe_expert_ratio")
    if searcher.cost_model == COST_MODEL_ACTIVE_MOE and not searcher.cost and searcher.active_moe_expert_ratio:
        searcher.cost = {ACTIVE_MOE_EXPERT_RATIO_KEY: searcher.active_moe_expert_ratio}
    searcher.config = {**searcher.default_search_config, "cost_model": searcher.cost_model, "cost": searcher.cost,
                       "active_moe_expert_ratio": searcher.active_moe_expert_ratio}
    return searcher


def solve_stats(stats: dict[str, dict[str, Any]], cap: float, denominator: float, method: str,
                searcher: Any) -> SolveRecord:
    """The exact selection for ModelOpt's ``candidate_stats`` under ``cap``, and ModelOpt's own beside it (computed
    on ``searcher``, which holds the same stats and its cost model).

    Raises :class:`selection.InfeasibleBudget` when even the cheapest choice exceeds the cap.
    """
    problem = Problem.from_candidate_stats(stats, cap, denominator)
    selection = solve(problem, OBJECTIVE_OF_METHOD[method])
    modelopt = compare(problem, selection, _modelopt_choice(searcher, method, stats, cap))
    if not selection.optimal:
        log.warning("exact selection stopped before its proof (pathological input): certified gap %.3g (%.3g "
                    "relative)", selection.gap, selection.relative_gap)
    return SolveRecord(problem, selection, modelopt)


def _recipe_info(stats: dict[str, dict[str, Any]], choice: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """``run_search_with_stats``'s return shape: format, cost and score of the chosen candidate per group."""
    return {name: {"format": st["formats"][j], "costs": st["costs"][j], "scores": st["scores"][j]}
            for (name, st), j in zip(stats.items(), choice)}


def _exact_run_search_with_stats(self: Any, max_weight_size: float, verbose: bool = False) -> tuple[dict, bool]:
    """Stands in for ``run_search_with_stats`` of both searchers inside :func:`exact_selection`."""
    method = getattr(self, "method_name", "gradient")
    stats = self.candidate_stats
    record = solve_stats(stats, max_weight_size, denominator_of(stats, getattr(self, "cost_denominator", None)),
                         method, self)
    self.best["selection"] = record
    return _recipe_info(stats, record.selection.choice), True


setattr(_exact_run_search_with_stats, _PATCHED, True)


@contextlib.contextmanager
def exact_selection() -> Iterator[None]:
    """Inside this block every ModelOpt AutoQuantize solve is the exact one (re-entrant; restored on exit)."""
    global _depth
    with _lock:
        if _depth == 0:
            for cls in _searcher_classes().values():
                _originals[cls] = cls.__dict__["run_search_with_stats"]
                cls.run_search_with_stats = _exact_run_search_with_stats  # type: ignore[attr-defined]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for cls, fn in _originals.items():
                    cls.run_search_with_stats = fn  # type: ignore[attr-defined]
                _originals.clear()


def solve_state(state: dict[str, Any], effective_bits: float) -> dict[str, Any]:
    """Re-solve a finished search state for ``effective_bits``: the new ``best`` dict (``recipe``, ``constraints``,
    ``score``, ``is_satisfied``, ``selection``), as ModelOpt's ``run_search`` would have set it."""
    stats = state["candidate_stats"]
    denominator = denominator_of(stats, state.get("cost_denominator"))
    cap = cap_of(denominator, effective_bits)
    record = solve_stats(stats, cap, denominator, state["method"], _offline_searcher(state))
    info = _recipe_info(stats, record.selection.choice)
    return {
        "recipe": {name: i["format"] for name, i in info.items()},
        # run_search's own arithmetic: the float sums in group order.
        "constraints": {"effective_bits": sum(i["costs"] for i in info.values()) / denominator * 16},
        "score": sum(i["scores"] for i in info.values()),
        "is_satisfied": True,
        "selection": record,
    }


def manifest_section(record: SolveRecord | None) -> dict[str, Any] | None:
    """The manifest's ``selection`` section (docs/manifest.md); None for a search state solved elsewhere."""
    if record is None:
        return None
    sel, mo = record.selection, record.modelopt
    out: dict[str, Any] = {
        "solver": sel.solver, "version": sel.version, "objective": sel.objective,
        "objective_text": OBJECTIVES[sel.objective], "tie_rule": TIE_RULE, "optimal": sel.optimal,
        "gap": sel.gap, "relative_gap": sel.relative_gap, "score": sel.score, "cost": sel.cost,
        "cap": record.problem.cap, "effective_bits": sel.effective_bits, "nodes": sel.nodes, "seconds": sel.seconds,
        "modelopt": None,
    }
    if mo is not None:
        out["modelopt"] = {
            "solver": "PuLP/CBC (LPS)" if sel.objective == "min-sum" else "threshold bisection",
            "status": mo.status, "seconds": mo.seconds, "score": mo.score, "effective_bits": mo.effective_bits,
            "within_budget": mo.within_budget, "objective_value": mo.objective_value, "differs": mo.differs,
            "differing_groups": [g.removesuffix(".quant_recipe") for g in mo.differing_groups],
            "score_gap": mo.score_gap, "relative_score_gap": mo.relative_score_gap, "error": mo.error,
        }
    return out
