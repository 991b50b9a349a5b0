"""``SearchSession``: one loaded model and calibration set, many schemes, each scoring pass paid once.

The session keeps the last search. A scheme with the same scoring identity re-solves in memory on that searched
model (:func:`resolve_budget`, ~0.04 s on the 3B); anything else starts from a fresh copy of the pristine model
and searches, reusing ModelOpt's checkpoint from the cache when the identity matches one on disk. Formats that
fold scales into the weights (SmoothQuant, AWQ) never re-solve in memory: their searched weights hold the
previous choice's fold, so they search again from pristine weights (calibration and scores still come from the
cache). The CLI, the Python API and the sweep's model workers all go through here.

Before a batch of schemes, :meth:`SearchSession.prepare` runs one shared scoring pass per group of schemes that
differ only in their candidate formats (``autoquant/passes.py``), so each of them then re-solves from the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from auto_quantize_model.autoquant.identity import DataIdentity, scoring_key
from auto_quantize_model.autoquant.passes import ScoringPass, plan_passes
from auto_quantize_model.autoquant.run import RunResult, folds_weights, resolve_budget, run_scheme
from auto_quantize_model.autoquant.scoring_pass import PassOutcome, run_scoring_pass
from auto_quantize_model.configs.schemes import Scheme
from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.models.loading import LoadedModel

log = logging.getLogger(__name__)


class SearchSession:
    """Runs schemes on ``loaded`` + ``calib``; ``loaded.model`` stays pristine."""

    def __init__(self, loaded: LoadedModel, calib: CalibrationData, cache_dir: str | Path,
                 fresh_model: Callable[[], nn.Module] | None = None) -> None:
        self.loaded = loaded
        self.calib = calib
        self.cache_dir = Path(cache_dir)
        self.identity = DataIdentity.of(loaded, calib)
        self._fresh_model = fresh_model or (lambda: copy.deepcopy(loaded.model))
        self.last: RunResult | None = None
        self.last_copy_seconds = 0.0  # time to make (and check) the fresh copy for the last new search

    def key(self, scheme: Scheme) -> str:
        """The scheme's scoring identity on this model and data."""
        return scoring_key(self.identity, scheme)

    def prepare(self, schemes: list[Scheme]) -> list[PassOutcome]:
        """Run the shared scoring passes ``schemes`` need (none if no two differ only in their formats)."""
        passes = {id(p): p for p in plan_passes(self.identity, schemes).values()}
        return [self.run_pass(p) for p in passes.values()]

    def run_pass(self, scoring_pass: ScoringPass) -> PassOutcome:
        """Make sure every member of ``scoring_pass`` finds its checkpoint in the cache (searching once if not)."""
        if not scoring_pass.members:
            raise ValueError("a scoring pass needs members")

        def fresh() -> nn.Module:  # only when the pass must search: free the last searched model first
            self.last = None
            return self._fresh_model()

        return run_scoring_pass(self.loaded, self.calib, scoring_pass, self.cache_dir, fresh)

    def can_resolve_in_memory(self, scheme: Scheme) -> bool:
        """Same identity as the last search, and no format that folds scales into the weights."""
        return (self.last is not None and self.last.manifest["score_cache"]["key"] == self.key(scheme)
                and not folds_weights(scheme))

    def run(self, scheme: Scheme, output_dir: str | Path, *, run_id: str | None = None,
            sweep_id: str | None = None) -> RunResult:
        """Search (or re-solve) ``scheme`` and write its outputs to ``output_dir``."""
        if self.can_resolve_in_memory(scheme):
            assert self.last is not None
            self.last_copy_seconds = 0.0
            self.last = resolve_budget(self.last, self.loaded, self.calib, scheme, output_dir, run_id=run_id,
                                       sweep_id=sweep_id)
            return self.last
        self.last = None  # free the last searched model before making a new copy
        t = time.perf_counter()
        work = self._fresh_model()
        self.last_copy_seconds = time.perf_counter() - t
        self.last = run_scheme(dataclasses.replace(self.loaded, model=work), self.calib, scheme, output_dir,
                               cache_dir=self.cache_dir, inplace=True, run_id=run_id, sweep_id=sweep_id)
        return self.last
