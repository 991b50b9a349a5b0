"""Running a shared scoring pass (``passes.py`` plans them and derives member checkpoints): one search over the
union of formats, then every member's checkpoint derived from it into the search cache.

Its own module so that ``passes.py`` (which the sweep driver imports to plan passes) stays free of torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from auto_quantize_model.autoquant.cache import SearchCache
from auto_quantize_model.autoquant.identity import DataIdentity, effective_steps, scoring_key
from auto_quantize_model.autoquant.passes import ScoringPass, derive_state, raw_scores
from auto_quantize_model.autoquant.search import PhaseClock, auto_quantize
from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.format_facts import format_signature
from auto_quantize_model.models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassOutcome:
    """What :func:`run_scoring_pass` did."""

    key: str  # the pass's own scoring key
    ran: bool  # calibrated and scored now (False: its checkpoint was in the cache, or nothing was missing)
    derived: tuple[str, ...]  # member scoring keys whose checkpoints were written now
    seconds: float


def run_scoring_pass(loaded: LoadedModel, calib: CalibrationData, scoring_pass: ScoringPass,
                     cache_dir: str | Path, fresh_model: Callable[[], nn.Module]) -> PassOutcome:
    """Make sure every member of ``scoring_pass`` has a verified checkpoint in ``cache_dir``.

    Searches the union of formats once (on ``fresh_model()``, discarded after) unless the pass's own checkpoint is
    cached, then derives each missing member's checkpoint from it (:func:`passes.derive_state`). A member whose
    checkpoint cannot be derived (a pass checkpoint without raw scores) is left to search on its own.
    """
    from modelopt.torch.utils.serialization import safe_load

    t0 = time.perf_counter()
    identity = DataIdentity.of(loaded, calib)
    ident = identity.to_dict()
    cache = SearchCache(cache_dir)
    key = scoring_pass.key(identity)
    members = {scoring_key(identity, m): m for m in scoring_pass.members}
    todo = {k: m for k, m in members.items() if k != key and not cache.ready(k, ident)}
    if not todo and (key not in members or cache.ready(key, ident)):
        return PassOutcome(key, False, (), time.perf_counter() - t0)
    ran = False
    with cache.entry(key, ident) as entry:
        if entry.reusable:
            raw = entry.marker.get("raw_scores")
        else:
            scheme = scoring_pass.scheme
            steps = effective_steps(scheme, identity.num_batches, identity.batch_size)
            log.info("shared scoring pass %s: formats %s for %d schemes, %s", key, list(scheme.quantization_formats),
                     len(members), steps)
            model, _ = auto_quantize(loaded, fresh_model(), calib, scheme, entry, steps, PhaseClock())
            raw = raw_scores(model)
            entry.extra["raw_scores"] = raw
            del model
            ran = True
    derived = []
    if raw is None:
        log.warning("shared scoring pass %s: its cached checkpoint has no raw scores (a plain search wrote it); "
                    "%d member(s) search on their own", key, len(todo))
    elif todo:
        state = safe_load(str(cache.paths(key)[0]))
        for k, m in todo.items():
            sigs = {format_signature(f) for f in m.quantization_formats}
            if cache.store(k, ident, derive_state(state, raw, sigs), derived_from=key):
                derived.append(k)
    seconds = time.perf_counter() - t0
    log.info("phase scoring pass %s: %s, derived %d member checkpoint(s) in %.2fs", key,
             "calibrated and scored" if ran else "from the cache", len(derived), seconds)
    return PassOutcome(key, ran, tuple(derived), seconds)
