"""``SearchSession``: one loaded model and calibration set, many schemes, each scoring pass paid once.

The session keeps the last search. A scheme with the same scoring identity re-solves in memory on that searched
model (:func:`resolve_budget`: an exact solve of milliseconds, ModelOpt's CBC solve beside it for comparison, the
manifest and artifact written); anything else starts from a fresh copy of the pristine model
and searches, reusing ModelOpt's checkpoint from the cache when the identity matches one on disk.

When the session moves to another identity it parks the last searched model instead of dropping it: its weights
are released (every parameter's storage), its module tree with ModelOpt's per-format quantizers and hparams
stays (a few MB). Coming back to a parked identity takes a fresh copy of the pristine weights into that tree and
re-solves in memory: one weight copy instead of ModelOpt's model conversion, quantizer re-insertion and checkpoint
load (``mtq.auto_quantize(checkpoint=...)``, most of a cache re-solve: docs/benchmarks.md). The searched weights
of such a model are the pristine ones, so the result is the cache re-solve's, bit for bit (tests/test_selection.py);
formats that fold scales into the weights are never parked. Formats that
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
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from auto_quantize_model.autoquant.identity import DataIdentity, scoring_key
from auto_quantize_model.autoquant.passes import ScoringPass, plan_passes
from auto_quantize_model.autoquant.run import RunResult, folds_weights, resolve_budget, run_scheme
from auto_quantize_model.autoquant.scoring_pass import PassOutcome, run_scoring_pass
from auto_quantize_model.configs.schemes import Scheme
from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.models.loading import LoadedModel

log = logging.getLogger(__name__)

MAX_PARKED = 8  # parked searched models per session (each holds its quantizers, not its weights)


def release_weights(model: nn.Module) -> None:
    """Free every parameter's storage; the module tree, its buffers (quantizer amax) and ModelOpt's hparams stay."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def take_weights(model: nn.Module, source: nn.Module) -> bool:
    """Point every parameter of ``model`` at ``source``'s parameter of the same name (no copy); False, and nothing
    changed, unless the two have exactly the same parameter names and dtypes."""
    src = dict(source.named_parameters())
    own = dict(model.named_parameters())
    if src.keys() != own.keys() or any(own[n].dtype != src[n].dtype for n in own):
        return False
    for name, p in own.items():
        p.data = src[name].data
    return True


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
        self._last_parkable = False  # the last search's formats leave the weights pristine (no fold)
        self.parked: OrderedDict[str, RunResult] = OrderedDict()  # scoring key -> searched model without weights
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

        def fresh() -> nn.Module:  # only when the pass must search: free the last searched model's weights first
            self._park_last()
            return self._fresh_model()

        return run_scoring_pass(self.loaded, self.calib, scoring_pass, self.cache_dir, fresh)

    def warm_keys(self) -> list[str]:
        """Scoring keys that re-solve in memory now: the last search's and the parked ones."""
        last = [self.last.manifest["score_cache"]["key"]] if self.last is not None else []
        return last + [k for k in self.parked if k not in last]

    def can_resolve_in_memory(self, scheme: Scheme) -> bool:
        """Same identity as the last search or a parked one, and no format that folds scales into the weights."""
        return self.key(scheme) in self.warm_keys() and not folds_weights(scheme)

    def run(self, scheme: Scheme, output_dir: str | Path, *, run_id: str | None = None,
            sweep_id: str | None = None) -> RunResult:
        """Search (or re-solve) ``scheme`` and write its outputs to ``output_dir``.

        The returned result's model is the session's: a later ``run`` or ``run_pass`` under another scoring key
        releases its weights (it is parked), so use it before the next one."""
        key = self.key(scheme)
        folds = folds_weights(scheme)
        if not folds and self.last is not None and self.last.manifest["score_cache"]["key"] == key:
            self.last_copy_seconds = 0.0
            self.last = resolve_budget(self.last, self.loaded, self.calib, scheme, output_dir, run_id=run_id,
                                       sweep_id=sweep_id)
            return self.last
        self._park_last()  # release the last searched model's weights before making a new copy
        t = time.perf_counter()
        work = self._fresh_model()
        parked = None if folds else self.parked.pop(key, None)
        if parked is not None and take_weights(parked.model, work):
            del work
            self.last_copy_seconds = time.perf_counter() - t
            log.info("scheme %s: back to the parked search of %s (fresh weights in %.2fs)", scheme.name, key,
                     self.last_copy_seconds)
            self.last, self._last_parkable = parked, True  # kept warm even if this budget is refused
            self.last = resolve_budget(parked, self.loaded, self.calib, scheme, output_dir, run_id=run_id,
                                       sweep_id=sweep_id)
        else:
            self.last_copy_seconds = time.perf_counter() - t
            self.last = run_scheme(dataclasses.replace(self.loaded, model=work), self.calib, scheme, output_dir,
                                   cache_dir=self.cache_dir, inplace=True, run_id=run_id, sweep_id=sweep_id)
        self._last_parkable = not folds
        return self.last

    def _park_last(self) -> None:
        """Park the last searched model (weights released, quantizers kept under its key) if its weights were
        pristine; else just let it go."""
        last, self.last = self.last, None
        if last is not None and self._last_parkable:
            release_weights(last.model)
            key = last.manifest["score_cache"]["key"]
            self.parked[key] = last
            self.parked.move_to_end(key)
            while len(self.parked) > MAX_PARKED:
                self.parked.popitem(last=False)
