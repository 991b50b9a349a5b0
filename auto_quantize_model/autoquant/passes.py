"""Shared scoring passes: one calibrate + score over the union of candidate formats serves every scheme whose
search differs only in which of those formats it offers.

Why this is exact. ``mtq.auto_quantize`` (ModelOpt 0.47, ``algorithms.py``):

- calibrates each candidate format on its own: every group is switched to that format (the other formats'
  quantizer objects are swapped out, not touched), so a format's calibrated quantizers do not depend on which
  other formats are candidates (weights are never folded during the search);
- scores each (group, format) from the output difference of that group alone, quantized with that format, on the
  BF16 forward and backward pass, so a raw score does not depend on the other candidates either.

Only two things in ModelOpt's search checkpoint depend on the candidate set: the format signatures it records
(checked when the checkpoint is loaded), and the non-increasing clamp ``initialize_candidate_stats`` applies along
each group's candidates in order of compression (``score = min(score, previous)``). So a member's checkpoint is
derived from the pass's with its formats' calibration kept, its signatures rewritten, and its scores re-clamped
from the pass's *raw* scores (read from the searched model; the clamped ones cannot be undone). ModelOpt then
checks the derived checkpoint against the member's own search setup like any other cache entry.

What is not shared, because sharing could change a number:

- different disabled or cost-excluded layers, steps, data or method: each is part of the pass grouping key. A
  layer disabled in one scheme only (even ``lm_head``, whose output feeds nothing) is not shared: every format's
  calibration snapshot holds the quantizer state of every module, disabled ones included;
- formats that fold scales into the weights (SmoothQuant, AWQ);
- ``kl_div``: its scores are per format too, but no test pins it bit for bit yet.

``scoring_pass.py`` runs a planned pass (one search, then the derived member checkpoints into the cache).

Tests: ``tests/test_passes.py`` shows a member re-solved from a shared pass equals its standalone search (layer
choices, scores, logits; CPU, bit for bit), and that the re-clamp differs from filtering the clamped scores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from auto_quantize_model.autoquant.identity import DataIdentity, scoring_fields, scoring_key
from auto_quantize_model.configs.schemes import Scheme
from auto_quantize_model.io_utils import sha256_json

log = logging.getLogger(__name__)

SHARED_METHODS = frozenset({"gradient"})
PASS_NAME_PREFIX = "scoring-pass-"
PASS_BUDGET = 16.0  # the pass's own solve is never used; 16 bits is always feasible


def _folds(scheme: Scheme) -> bool:
    from auto_quantize_model.format_facts import format_folds_weights

    return any(format_folds_weights(f) for f in scheme.quantization_formats)


def pass_group(identity: DataIdentity, scheme: Scheme) -> str | None:
    """The key of the schemes that may share a pass with ``scheme``: its scoring identity without the formats.

    None when ``scheme`` never shares (method or formats outside what is shown to be exact).
    """
    if scheme.method not in SHARED_METHODS or _folds(scheme):
        return None
    fields = scoring_fields(identity, scheme)
    fields["search"].pop("quantization_formats")
    return sha256_json(fields)


@dataclass(frozen=True)
class ScoringPass:
    """One search over the union of formats; its checkpoint serves every member's scoring key."""

    scheme: Scheme  # the union scheme actually searched (budget 16)
    members: tuple[Scheme, ...]  # one scheme per distinct member scoring key

    def key(self, identity: DataIdentity) -> str:
        """The pass's own scoring key (its cache entry)."""
        return scoring_key(identity, self.scheme)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (travels with sweep trials)."""
        return {"scheme": self.scheme.to_dict(), "members": [m.to_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringPass:
        """Inverse of :meth:`to_dict`."""
        return cls(Scheme.from_dict(data["scheme"]), tuple(Scheme.from_dict(m) for m in data["members"]))


def _union_scheme(schemes: list[Scheme], group: str) -> Scheme:
    from auto_quantize_model.format_facts import format_signature

    by_signature: dict[str, str] = {}
    for s in schemes:
        for f in s.quantization_formats:
            by_signature.setdefault(format_signature(f), f)
    formats = tuple(sorted(by_signature.values()))
    return dataclasses.replace(
        schemes[0], name=f"{PASS_NAME_PREFIX}{group[:12]}", quantization_formats=formats, effective_bits=PASS_BUDGET,
        description=f"shared scoring pass over {', '.join(formats)} for {', '.join(sorted({s.name for s in schemes}))}",
        recipe=None)


def plan_passes(identity: DataIdentity, schemes: Iterable[Scheme]) -> dict[str, ScoringPass]:
    """Shared passes for ``schemes``: member scoring key -> the pass that serves it.

    A pass is planned only where it saves work: two or more distinct scoring keys in one group. A scheme not in
    the result searches on its own, as before.
    """
    groups: dict[str, dict[str, Scheme]] = defaultdict(dict)
    for s in schemes:
        g = pass_group(identity, s)
        if g is not None:
            groups[g].setdefault(scoring_key(identity, s), s)
    out: dict[str, ScoringPass] = {}
    for g, members in groups.items():
        if len(members) < 2:
            continue
        union = _union_scheme(list(members.values()), g)
        if pass_group(identity, union) != g:  # exclusions that follow the formats differ: not one setup
            log.info("scoring pass for %s not shared: the union of formats changes the search setup",
                     sorted(m.name for m in members.values()))
            continue
        sp = ScoringPass(union, tuple(members.values()))
        out.update({k: sp for k in members})
    return out


# -- ModelOpt state: raw scores out of a searched model, derived checkpoints in ---------------------------------


def raw_scores(model: Any) -> dict[str, Any]:
    """Unclamped score of every (group, candidate) of a model ModelOpt just scored, JSON-ready.

    ``{"formats": [signature, ...], "scores": {hparam name: {format index: score}}}``; the same sums
    ``initialize_candidate_stats`` computes before clamping (``QuantRecipeHparam.get_score``).
    """
    from modelopt.torch.opt.utils import named_hparams
    from modelopt.torch.quantization.algorithms import QuantRecipeHparam

    formats: list[str] = []
    index: dict[str, int] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, hp in named_hparams(model, unique=True):
        if not isinstance(hp, QuantRecipeHparam):
            continue
        row = {}
        for recipe in hp.solver_choices:
            sig = recipe.checkpoint_signature
            if sig not in index:
                index[sig] = len(formats)
                formats.append(sig)
            row[str(index[sig])] = float(hp.get_score(recipe))
        scores[name] = row
    return {"formats": formats, "scores": scores}


def _clamped(raw: list[float]) -> list[float]:
    """ModelOpt's clamp along the candidates in order of compression (``initialize_candidate_stats``)."""
    out, prev = [], math.inf
    for s in raw:
        prev = min(s, prev)
        out.append(prev)
    return out


def derive_state(state: dict[str, Any], raw: dict[str, Any], member_signatures: set[str]) -> dict[str, Any]:
    """The search checkpoint a standalone search over ``member_signatures`` would have written.

    ``state`` is the pass's checkpoint, ``raw`` its :func:`raw_scores`. Raises ``ValueError`` if the pass does not
    hold every member format or a raw score is missing.
    """
    from modelopt.torch.quantization.algorithms import QuantRecipe

    none_sig = QuantRecipe(quant_cfg=None).checkpoint_signature
    keep = set(member_signatures) | {none_sig}
    sig_index = {sig: str(i) for i, sig in enumerate(raw["formats"])}
    calibrated = {r.checkpoint_signature: r for r in state["quantizer_states"]}
    if not set(member_signatures) <= set(calibrated):
        raise ValueError("the scoring pass did not calibrate every member format")
    stats: dict[str, dict[str, Any]] = defaultdict(dict)
    for name, st in state["candidate_stats"].items():
        idx = [i for i, r in enumerate(st["formats"]) if r.checkpoint_signature in keep]
        try:
            member_raw = [raw["scores"][name][sig_index[st["formats"][i].checkpoint_signature]] for i in idx]
        except KeyError as exc:
            raise ValueError(f"the scoring pass has no raw score for {name}") from exc
        stats[name] = {**st, "formats": [st["formats"][i] for i in idx], "costs": [st["costs"][i] for i in idx],
                       "scores": _clamped(member_raw)}
    setup = [(*e[:4], tuple(s for s in e[4] if s in keep), *e[5:]) for e in state["resolved_search_setup_signature"]]
    return {
        **state,
        "candidate_stats": stats,
        "quantizer_states": {r: v for r, v in state["quantizer_states"].items()
                             if r.checkpoint_signature in member_signatures},
        "quantization_formats_signature": tuple(sorted(member_signatures)),
        "resolved_search_setup_signature": tuple(sorted(setup, key=repr)),
        "best": {"recipe": {}, "constraints": {}, "score": float("inf"), "is_satisfied": False},
    }
