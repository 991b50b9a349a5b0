"""The AutoQuant scheme catalog: one frozen dataclass per scheme, one registry, versioned JSON.

A scheme names the candidate formats, the default effective-bits budget and the search settings.
The one place settings are resolved is :func:`resolve_scheme`: catalog (or ``--schemes-file``)
defaults, then explicit overrides from the CLI or the sweep. Scheme files use ModelOpt's
AutoQuantize recipe vocabulary (``candidate_formats``, ``auto_quantize_method``, ``score_size``,
``disabled_layers``, ``cost_excluded_layers``) and keep the older names as aliases; a ModelOpt recipe
(path or built-in name) is accepted wherever a scheme name is (:mod:`.recipes`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_quantize_model.config_types import check_table
from auto_quantize_model.configs.exclusions import SCHEME_SOURCE, ExclusionPattern, format_exclusions
from auto_quantize_model.errors import UserError, check_positive
from auto_quantize_model.io_utils import read_toml

SCHEME_SCHEMA_VERSION = 1
# What each key of a scheme must be in a schemes file (config_types kinds): a string where a list belongs
# would otherwise become one format per character.
SCHEME_KINDS = {"name": "str", "quantization_formats": "list[str]", "effective_bits": "number", "method": "str",
                "num_score_steps": "int", "num_calib_steps": "int", "disabled_layers": "list[str]",
                "description": "str", "format_exclusions": "bool", "cost_excluded_layers": "list[str]",
                "cost_exclude_disabled": "bool", "score_size": "int?", "recipe": "str?"}
METHODS = ("gradient", "kl_div")


@dataclass(frozen=True)
class Scheme:
    """One AutoQuant recipe. ``effective_bits`` is the default budget over LM Linear weights (16 = BF16)."""

    name: str
    quantization_formats: tuple[str, ...]
    effective_bits: float
    method: str = "gradient"
    num_score_steps: int = 16
    num_calib_steps: int = 16
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

    def __post_init__(self) -> None:
        # Lists from TOML/JSON become tuples so the dataclass stays hashable and immutable.
        for key in ("quantization_formats", "disabled_layers", "cost_excluded_layers"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        # The budget is one float from TOML/CLI to the manifest and tables (TOML `effective_bits = 14` is an int).
        if isinstance(self.effective_bits, int) and not isinstance(self.effective_bits, bool):
            object.__setattr__(self, "effective_bits", float(self.effective_bits))

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

    def search_setup(self) -> SearchSetup:
        """The resolved exclusions: explicit patterns first, then the formats' own disables."""
        disabled = [ExclusionPattern(p, SCHEME_SOURCE) for p in self.disabled_layers]
        if self.format_exclusions:
            seen = set(self.disabled_layers)
            disabled += [e for e in format_exclusions(self.quantization_formats) if e.pattern not in seen]
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


# Recipe-vocabulary names (ModelOpt's AutoQuantize recipe schema) -> Scheme field names.
RECIPE_ALIASES = {"candidate_formats": "quantization_formats", "auto_quantize_method": "method"}


def scheme_from_table(name: str, table: dict[str, Any], where: str) -> Scheme:
    """A scheme from a TOML-style table in ModelOpt's recipe vocabulary (old field names still accepted).

    ``constraints = {effective_bits = B}`` is accepted as in a recipe; ``cost_model`` must be ``weight``.
    """
    data = dict(table)
    for alias, field in RECIPE_ALIASES.items():
        if alias in data:
            if field in data:
                raise UserError(f"{where}: scheme {name!r} sets both {alias!r} and its alias {field!r}; keep one")
            data[field] = data.pop(alias)
    constraints = data.pop("constraints", None)
    if constraints is not None:
        if not isinstance(constraints, dict) or set(constraints) - {"effective_bits", "cost_model"}:
            raise UserError(f"{where}: scheme {name!r}: constraints may hold effective_bits and cost_model only")
        if constraints.get("cost_model", "weight") != "weight":
            raise UserError(f"{where}: scheme {name!r}: only the 'weight' cost model applies to a dense LM")
        if "effective_bits" in constraints:
            if "effective_bits" in data:
                raise UserError(f"{where}: scheme {name!r} sets effective_bits twice (top level and constraints)")
            data["effective_bits"] = constraints["effective_bits"]
    return Scheme.from_dict({"name": name, **data})


# The catalog, written as scheme-file tables. The three default schemes keep FP8_DEFAULT_CFG's own
# layer exclusions (lm_head, routers, vision, ... as the installed ModelOpt lists them) out of the
# search and out of the budget; the all-layers scheme uses a format with none, so it searches lm_head.
_CATALOG_TABLES: dict[str, dict[str, Any]] = {
    "fp8_autoquant_top25": {
        "candidate_formats": ["FP8_DEFAULT_CFG"], "constraints": {"effective_bits": 14.0},
        "auto_quantize_method": "gradient", "format_exclusions": True,
        "description": "FP8 or BF16 per layer group, FP8_DEFAULT_CFG's exclusions kept BF16 and out of the "
        "budget; about 25% of the searched weights may be FP8 (16 - 8 * 0.25 = 14 effective bits).",
    },
    "fp8_autoquant_top50": {
        "candidate_formats": ["FP8_DEFAULT_CFG"], "constraints": {"effective_bits": 12.0},
        "auto_quantize_method": "gradient", "format_exclusions": True,
        "description": "As top25 with about 50% of the searched weights FP8 (12 bits).",
    },
    "fp8_autoquant_full": {
        "candidate_formats": ["FP8_DEFAULT_CFG"], "constraints": {"effective_bits": 8.0},
        "auto_quantize_method": "gradient", "format_exclusions": True,
        "description": "Every searched layer may be FP8 (8 bits); lm_head and the format's other exclusions stay BF16.",
    },
    "fp8_autoquant_all_layers_fp8": {
        "candidate_formats": ["FP8_ALL_LAYERS_CFG"], "constraints": {"effective_bits": 8.0},
        "auto_quantize_method": "gradient", "format_exclusions": True,  # FP8_ALL_LAYERS_CFG has none
        "description": "FP8_ALL_LAYERS_CFG (FP8 without ModelOpt's name-pattern exclusions): every Linear is "
        "searched and budgeted, lm_head included; the whole-VLM variant of this study.",
    },
}

# Mixed-format schemes (not FP8-only), in the catalog beside the four FP8 schemes.
_MIXED_TABLES: dict[str, dict[str, Any]] = {
    # A mixed-format scheme that runs on CPU (INT4 block weight-only fake quant is plain PyTorch; NVFP4
    # needs CUDA/Triton). On a GPU, the built-in recipe general/auto_quantize/nvfp4_fp8_at_5p4bits is
    # the NVFP4 + FP8 counterpart.
    "int4w_fp8_autoquant_mix": {
        "candidate_formats": ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG"],
        "constraints": {"effective_bits": 6.0}, "auto_quantize_method": "gradient", "format_exclusions": True,
        "description": "INT4 block weight-only, FP8 or BF16 per layer group (4 to 16 bits), the formats' "
        "exclusions kept BF16 and out of the budget.",
    },
}

AUTOQUANT_FP8_SCHEMES: dict[str, Scheme] = {
    name: scheme_from_table(name, table, "scheme catalog") for name, table in _CATALOG_TABLES.items()
}
MIXED_FORMAT_SCHEMES: dict[str, Scheme] = {
    name: scheme_from_table(name, table, "scheme catalog") for name, table in _MIXED_TABLES.items()
}


def load_schemes_file(path: str | Path) -> dict[str, Scheme]:
    """Read user schemes from TOML: one ``[schemes.NAME]`` table per scheme (recipe field names)."""
    p = Path(path)
    data = read_toml(p, "schemes file", "pass a TOML file with [schemes.NAME] tables")
    tables = data.get("schemes")
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"schemes file {p} has no [schemes.NAME] tables")
    out = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"schemes file {p}: schemes.{name} must be a table")
        out[name] = scheme_from_table(name, table, f"schemes file {p}")
    return out


def scheme_catalog(schemes_file: str | Path | None = None) -> dict[str, Scheme]:
    """The built-in catalog, extended (or overridden by name) by a schemes file."""
    catalog = {**AUTOQUANT_FP8_SCHEMES, **MIXED_FORMAT_SCHEMES}
    if schemes_file:
        catalog.update(load_schemes_file(schemes_file))
    return catalog


def get_scheme(name: str, schemes_file: str | Path | None = None) -> Scheme:
    """Look a scheme up by name, with a one-line error listing the known names."""
    from auto_quantize_model.configs.recipes import find_recipe, scheme_from_recipe

    catalog = scheme_catalog(schemes_file)
    if name in catalog:
        return catalog[name]
    recipe = find_recipe(name)
    if recipe is not None:
        return scheme_from_recipe(name, recipe)
    raise UserError(f"unknown scheme {name!r}; known schemes: {', '.join(sorted(catalog))} (or add one with "
                    "--schemes-file, or give a ModelOpt AutoQuantize recipe path or built-in name)")


def resolve_scheme(
    scheme: Scheme,
    *,
    effective_bits: float | None = None,
    method: str | None = None,
    num_score_steps: int | None = None,
    num_calib_steps: int | None = None,
    quant_config: str | None = None,
) -> Scheme:
    """Apply explicit overrides (None = keep the scheme's value) and validate the result."""
    from auto_quantize_model.modelopt_configs import format_effective_bits

    changes: dict[str, Any] = {}
    if effective_bits is not None:
        changes["effective_bits"] = float(effective_bits)
    if method is not None:
        changes["method"] = method
    if num_score_steps is not None:
        changes["num_score_steps"] = num_score_steps
        changes["score_size"] = None  # explicit steps replace a recipe's sample count
    if num_calib_steps is not None:
        changes["num_calib_steps"] = num_calib_steps
    if quant_config:
        changes["quantization_formats"] = tuple(q.strip() for q in quant_config.split(",") if q.strip())
    s = dataclasses.replace(scheme, **changes)

    if s.method not in METHODS:
        raise UserError(f"auto-quantize method {s.method!r} is unknown; use one of {', '.join(METHODS)}")
    for key in ("num_score_steps", "num_calib_steps"):
        check_positive(key.replace("_", "-"), getattr(s, key))
    if s.score_size is not None:
        check_positive("score-size", s.score_size)
    if not s.quantization_formats:
        raise UserError(f"scheme {s.name!r} has no quantization formats")
    lowest = min(format_effective_bits(f) for f in s.quantization_formats)  # also validates names
    if not lowest <= s.effective_bits <= 16.0:
        raise UserError(
            f"effective bits {s.effective_bits:g} cannot be reached with {', '.join(s.quantization_formats)}: "
            f"choose a target between {lowest:g} and 16"
        )
    return s
