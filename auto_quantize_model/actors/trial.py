"""``Trial``: one grid point of a sweep, resolved once on the driver and run as is by a model worker.

The sweep driver builds trials (``sweep.spec.expand_grid``) and adds their scoring fields
(``sweep.spec.assign_scoring_keys``); the worker runs ``trial.resolved`` and never looks the scheme up again, so
it needs neither the catalog nor the schemes file on its node. Declared here, below ``sweep/``, because the
worker reads it and ``actors/`` never imports ``sweep/`` (tests/test_import_graph.py).

The budget is ``effective_bits_target`` (a float) here, in the trials table, in Tune's report, in ``result.json``
and in the sweep summary (docs/tables.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_quantize_model.autoquant.passes import ScoringPass
from auto_quantize_model.configs.schemes import Scheme


@dataclass(frozen=True, kw_only=True)
class Trial:
    """A sweep trial: the settings that define it (and its id), its resolved scheme or the reason it has none,
    and the scoring fields the driver adds once the workers report their model and data."""

    trial_id: str  # deterministic from the settings below (sweep.spec.trial_id); resume depends on it
    scheme: str  # the scheme's name (a recipe's own name when the sweep gave a path)
    scheme_ref: str | None = None  # what the sweep listed, when that is not the name (a recipe path)
    effective_bits_target: float
    method: str
    num_score_steps: int | None  # None: the scheme's score_size decides
    num_calib_steps: int | None  # None: every loaded batch
    resolved: Scheme | None = None  # the scheme with this trial's settings applied
    error: str | None = None  # why it did not resolve: the trial fails alone with this error
    experiment_key: str | None = None  # sweep.spec.experiment_key of ``resolved``
    equivalent_schemes: tuple[str, ...] = ()  # other scheme names whose resolved experiment is this one
    scoring_key: str | None = None
    lease_key: str | None = None  # the shared pass's key, else ``scoring_key``
    scoring_pass: ScoringPass | None = None  # the shared scoring pass that serves this trial, if any

    def __post_init__(self) -> None:
        # One type for the budget from the flag to the summary (a TOML or JSON 14 is an int).
        object.__setattr__(self, "effective_bits_target", float(self.effective_bits_target))
        object.__setattr__(self, "equivalent_schemes", tuple(self.equivalent_schemes))
        if (self.resolved is None) == (self.error is None):
            raise ValueError(f"trial {self.trial_id}: give a resolved scheme or the error why there is none")
        if self.resolved is not None and self.resolved.effective_bits != self.effective_bits_target:
            raise ValueError(f"trial {self.trial_id}: resolved budget {self.resolved.effective_bits:g} is not the "
                             f"target {self.effective_bits_target:g}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (Tune's param_space, ``result.json``, the sweep's rows)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["resolved"] = self.resolved.to_dict() if self.resolved else None
        d["scoring_pass"] = self.scoring_pass.to_dict() if self.scoring_pass else None
        d["equivalent_schemes"] = list(self.equivalent_schemes)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        """Inverse of :meth:`to_dict`."""
        resolved, sp = data.get("resolved"), data.get("scoring_pass")
        return cls(**{**data, "resolved": Scheme.from_dict(resolved) if resolved else None,
                      "scoring_pass": ScoringPass.from_dict(sp) if sp else None})


def write_trial_error(tables: str | Path, sweep_id: str, trial: Trial, error: str) -> None:
    """The trials-table row of a trial that failed (no manifest): its settings and the error."""
    from auto_quantize_model.records.tables import write_trial

    write_trial(tables, None, scheme=trial.scheme, sweep_id=sweep_id, trial_id=trial.trial_id, status="error",
                error=error[:1000], method=trial.method, effective_bits_target=trial.effective_bits_target,
                equivalent_schemes=",".join(trial.equivalent_schemes))
