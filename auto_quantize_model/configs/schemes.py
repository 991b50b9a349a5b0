"""The AutoQuant scheme catalog: the built-in schemes, scheme files, recipes by name, and resolution.

A scheme (the :class:`Scheme` of ``configs/scheme.py``, importable from here too) names the candidate formats,
the default effective-bits budget and the search settings. The one place settings are resolved is
:func:`resolve_scheme`: catalog (or ``--schemes-file``) defaults, then explicit overrides from the CLI or the
sweep. Scheme files use ModelOpt's AutoQuantize recipe vocabulary (``candidate_formats``,
``auto_quantize_method``, ``score_size``, ``disabled_layers``, ``cost_excluded_layers``) and keep the older
names as aliases; a ModelOpt recipe (path or built-in name) is accepted wherever a scheme name is
(:mod:`.recipes`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from auto_quantize_model.configs.recipes import find_recipe, scheme_from_recipe
from auto_quantize_model.configs.scheme import METHODS, Scheme
from auto_quantize_model.errors import UserError, check_positive
from auto_quantize_model.io_utils import read_toml
from auto_quantize_model.path_names import check_path_name

__all__ = ["AUTOQUANT_FP8_SCHEMES", "MIXED_FORMAT_SCHEMES", "Scheme", "get_scheme", "load_schemes_file",
           "resolve_scheme", "scheme_catalog", "scheme_from_table"]

# Recipe-vocabulary names (ModelOpt's AutoQuantize recipe schema) -> Scheme field names.
RECIPE_ALIASES = {"candidate_formats": "quantization_formats", "auto_quantize_method": "method"}


def scheme_from_table(name: str, table: dict[str, Any], where: str) -> Scheme:
    """A scheme from a TOML-style table in ModelOpt's recipe vocabulary (old field names still accepted).

    ``constraints = {effective_bits = B}`` is accepted as in a recipe; ``cost_model`` must be ``weight``.
    """
    data = dict(table)
    if data.get("name", name) != name:
        raise UserError(f"{where}: scheme {name!r} sets name = {data['name']!r}; a scheme is named by its table, "
                        "drop the name key")
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
        check_path_name(name, f"schemes file {p}: scheme name", "rename the [schemes.NAME] table")
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
    from auto_quantize_model.format_facts import format_effective_bits

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
    check_positive("num-score-steps", s.num_score_steps)
    if s.num_calib_steps is not None:  # None: every loaded batch
        check_positive("num-calib-steps", s.num_calib_steps)
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
