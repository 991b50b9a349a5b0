"""The :class:`Scheme` type: what one AutoQuant search is told (formats, budget, method, steps, exclusions).

Its own module, below both the catalog (``schemes.py``) and the recipe reader (``recipes.py``), so that the
catalog's recipe fallback and the recipe reader's ``Scheme`` construction import it without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from auto_quantize_model.config_types import check_table
from auto_quantize_model.configs.exclusions import SCHEME_SOURCE, ExclusionPattern, export_exclusions, format_exclusions
from auto_quantize_model.errors import UserError
from auto_quantize_model.path_names import check_path_name

SCHEME_SCHEMA_VERSION = 1
# What each key of a scheme must be in a schemes file (config_types kinds): a string where a list belongs
# would otherwise become one format per character.
SCHEME_KINDS = {"name": "str", "quantization_formats": "list[str]", "effective_bits": "number", "method": "str",
                "num_score_steps": "int", "num_calib_steps": "int?", "disabled_layers": "list[str]",
                "description": "str", "format_exclusions": "bool", "cost_excluded_layers": "list[str]",
                "cost_exclude_disabled": "bool", "score_size": "int?", "recipe": "str?", "fused_scales": "str"}
METHODS = ("gradient", "kl_div")
# Served semantics of fused q/k/v and gate/up groups (autoquant/serving.py); kept here so configs stay torch-free.
FUSED_SCALES_MODES = ("shared", "separate")


@dataclass(frozen=True)
class Scheme:
    """One AutoQuant recipe. ``effective_bits`` is the default budget over LM Linear weights (16 = BF16)."""

    name: str
    quantization_formats: tuple[str, ...]
    effective_bits: float
    method: str = "gradient"
    num_score_steps: int = 16
    # Calibration batches; None (the default) = every loaded batch, as ModelOpt's hf_ptq calibrates on its whole
    # calibration set (num_calib_steps = len(calib_dataloader)). Scoring keeps num_score_steps (128 samples at
    # the default batch size of 8, hf_ptq's auto_quantize score size).
    num_calib_steps: int | None = None
    disabled_layers: tuple[str, ...] = ()
    description: str = ""
    # Keep the candidate formats' own name-pattern disables (lm_head, routers, vision, ...) out of
    # the search: ModelOpt's search ignores them inside a format config (see configs/exclusions.py).
    format_exclusions: bool = True
    # Module-name globs with cost weight 0: searched, but not counted in the effective-bits budget.
    cost_excluded_layers: tuple[str, ...] = ()
    # Layers kept out of the search also leave the budget, so the bits cover only what is searched.
    cost_exclude_disabled: bool = True
    # ModelOpt recipe vocabulary: scoring samples; steps = ceil(score_size / batch size). None: steps.
    score_size: int | None = None
    # The ModelOpt AutoQuantize recipe this scheme was read from (provenance), if any.
    recipe: str | None = None
    # "shared": one weight scale and one input scale per q/k/v and gate/up group (the group's max), as vLLM,
    # SGLang and TensorRT-LLM serve them, applied at calibration so scores, evaluation and export all see the
    # served model; "separate": ModelOpt's per-layer scales (engines that do not fuse). autoquant/serving.py.
    fused_scales: str = "shared"

    def __post_init__(self) -> None:
        # The name becomes file names (manifest, restore artifact, trial ids): refused here, before any write.
        check_path_name(self.name, "scheme name", "rename the [schemes.NAME] table or the recipe file")
        # Lists from TOML/JSON become tuples so the dataclass stays hashable and immutable.
        for key in ("quantization_formats", "disabled_layers", "cost_excluded_layers"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        # The budget is one float from TOML/CLI to the manifest and tables (TOML `effective_bits = 14` is an int).
        if isinstance(self.effective_bits, int) and not isinstance(self.effective_bits, bool):
            object.__setattr__(self, "effective_bits", float(self.effective_bits))
        if self.fused_scales not in FUSED_SCALES_MODES:
            raise UserError(f"scheme {self.name!r}: fused_scales {self.fused_scales!r} is unknown; use 'shared' (one "
                            "scale per q/k/v and gate/up group, as engines serve it) or 'separate'")

    def to_dict(self) -> dict[str, Any]:
        """Versioned, JSON-ready form."""
        d = dataclasses.asdict(self)
        for key in ("quantization_formats", "disabled_layers", "cost_excluded_layers"):
            d[key] = list(getattr(self, key))
        return {"schema_version": SCHEME_SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scheme:
        """Inverse of :meth:`to_dict`; refuses unknown versions and unknown keys."""
        data = dict(data)
        version = data.pop("schema_version", SCHEME_SCHEMA_VERSION)
        if version != SCHEME_SCHEMA_VERSION:
            raise UserError(f"scheme schema_version {version} is not supported (expected {SCHEME_SCHEMA_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"scheme {data.get('name', '?')!r} has unknown keys {unknown}; allowed: {sorted(known)}")
        missing = [k for k in ("name", "quantization_formats", "effective_bits") if k not in data]
        if missing:
            raise UserError(f"scheme {data.get('name', '?')!r} is missing {missing}")
        check_table(f"scheme {data['name']!r}", data, SCHEME_KINDS)
        return cls(**data)

    def score_steps(self, batch_size: int) -> int:
        """Scoring batches asked for: ``num_score_steps``, or ``score_size`` samples in batches."""
        if self.score_size is None:
            return self.num_score_steps
        return max(1, math.ceil(self.score_size / batch_size))

    def calib_steps(self, num_batches: int) -> int:
        """Calibration batches run: ``num_calib_steps`` (at most the loaded ones), or every loaded batch."""
        return num_batches if self.num_calib_steps is None else min(self.num_calib_steps, num_batches)

    def search_setup(self) -> SearchSetup:
        """The resolved exclusions: explicit patterns first, then the formats' own disables, then the layers the
        export cannot write (configs/exclusions.py ``export_exclusions``; every scheme, recipes included)."""
        disabled = [ExclusionPattern(p, SCHEME_SOURCE) for p in self.disabled_layers]
        if self.format_exclusions:
            seen = set(self.disabled_layers)
            disabled += [e for e in format_exclusions(self.quantization_formats) if e.pattern not in seen]
        seen = {e.pattern for e in disabled}
        disabled += [e for e in export_exclusions() if e.pattern not in seen]
        cost = [ExclusionPattern(p, SCHEME_SOURCE) for p in self.cost_excluded_layers]
        if self.cost_exclude_disabled:
            seen = set(self.cost_excluded_layers)
            cost += [e for e in disabled if e.pattern not in seen]
        return SearchSetup(tuple(disabled), tuple(cost))

    def search_constraints(self) -> dict[str, Any]:
        """``constraints`` for ``mtq.auto_quantize``: the budget, and the cost-excluded patterns."""
        return self.search_setup().constraints(self.effective_bits)


@dataclass(frozen=True)
class SearchSetup:
    """What ``mtq.auto_quantize`` is told besides formats and data: search and cost exclusions."""

    disabled: tuple[ExclusionPattern, ...]
    cost_excluded: tuple[ExclusionPattern, ...]

    @property
    def disabled_layers(self) -> list[str]:
        """Module-name globs for ``disabled_layers``."""
        return [e.pattern for e in self.disabled]

    @property
    def cost_excluded_layers(self) -> list[str]:
        """Module-name globs for ``constraints["cost"]["excluded_module_name_patterns"]``."""
        return [e.pattern for e in self.cost_excluded]

    def constraints(self, effective_bits: float) -> dict[str, Any]:
        """ModelOpt's constraints dict (``cost`` only when something is excluded from the budget)."""
        out: dict[str, Any] = {"effective_bits": float(effective_bits)}
        if self.cost_excluded:
            out["cost"] = {"excluded_module_name_patterns": self.cost_excluded_layers}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for manifests."""
        return {"disabled_layers": [e.to_dict() for e in self.disabled],
                "cost_excluded_layers": [e.to_dict() for e in self.cost_excluded]}
