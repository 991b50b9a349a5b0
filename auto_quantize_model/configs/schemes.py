"""The AutoQuant scheme catalog: one frozen dataclass per scheme, one registry, versioned JSON.

A scheme names the candidate formats, the default effective-bits budget and the search settings.
The one place settings are resolved is :func:`resolve_scheme`: catalog (or ``--schemes-file``)
defaults, then explicit overrides from the CLI or the sweep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_quantize_model.config_types import check_table
from auto_quantize_model.errors import UserError, check_positive
from auto_quantize_model.io_utils import read_toml

SCHEME_SCHEMA_VERSION = 1
# What each key of a scheme must be in a schemes file (config_types kinds): a string where a list belongs
# would otherwise become one format per character.
SCHEME_KINDS = {"name": "str", "quantization_formats": "list[str]", "effective_bits": "number", "method": "str",
                "num_score_steps": "int", "num_calib_steps": "int", "disabled_layers": "list[str]",
                "description": "str"}
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

    def __post_init__(self) -> None:
        # Lists from TOML/JSON become tuples so the dataclass stays hashable and immutable.
        object.__setattr__(self, "quantization_formats", tuple(self.quantization_formats))
        object.__setattr__(self, "disabled_layers", tuple(self.disabled_layers))

    def to_dict(self) -> dict[str, Any]:
        """Versioned, JSON-ready form."""
        d = dataclasses.asdict(self)
        d["quantization_formats"] = list(self.quantization_formats)
        d["disabled_layers"] = list(self.disabled_layers)
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


_FP8 = ("FP8_DEFAULT_CFG",)

AUTOQUANT_FP8_SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            name="fp8_autoquant_top25",
            quantization_formats=_FP8,
            effective_bits=14.0,
            description="FP8 or BF16 per layer group; budget lets about 25% of LM linear weights be FP8 "
            "(16 - 8 * 0.25 = 14 effective bits), the least sensitive first.",
        ),
        Scheme(
            name="fp8_autoquant_top50",
            quantization_formats=_FP8,
            effective_bits=12.0,
            description="FP8 or BF16 per layer group; about 50% of LM linear weights may be FP8 (12 bits).",
        ),
        Scheme(
            name="fp8_autoquant_full",
            quantization_formats=_FP8,
            effective_bits=8.0,
            description="Every LM linear may be FP8 (8 bits); the search still scores every group.",
        ),
        Scheme(
            name="fp8_autoquant_all_layers_fp8",
            quantization_formats=("FP8_ALL_LAYERS_CFG",),
            effective_bits=8.0,
            description="FP8_ALL_LAYERS_CFG (FP8 without ModelOpt's name-pattern exclusions) on every "
            "searched layer, lm_head included; the whole-VLM variant of this study.",
        ),
    )
}


def load_schemes_file(path: str | Path) -> dict[str, Scheme]:
    """Read user schemes from TOML: one ``[schemes.NAME]`` table per scheme."""
    p = Path(path)
    data = read_toml(p, "schemes file", "pass a TOML file with [schemes.NAME] tables")
    tables = data.get("schemes")
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"schemes file {p} has no [schemes.NAME] tables")
    out = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"schemes file {p}: schemes.{name} must be a table")
        out[name] = Scheme.from_dict({"name": name, **table})
    return out


def scheme_catalog(schemes_file: str | Path | None = None) -> dict[str, Scheme]:
    """The built-in catalog, extended (or overridden by name) by a schemes file."""
    catalog = dict(AUTOQUANT_FP8_SCHEMES)
    if schemes_file:
        catalog.update(load_schemes_file(schemes_file))
    return catalog


def get_scheme(name: str, schemes_file: str | Path | None = None) -> Scheme:
    """Look a scheme up by name, with a one-line error listing the known names."""
    catalog = scheme_catalog(schemes_file)
    if name not in catalog:
        raise UserError(f"unknown scheme {name!r}; known schemes: {', '.join(sorted(catalog))} (or add one with --schemes-file)")
    return catalog[name]


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
    if num_calib_steps is not None:
        changes["num_calib_steps"] = num_calib_steps
    if quant_config:
        changes["quantization_formats"] = tuple(q.strip() for q in quant_config.split(",") if q.strip())
    s = dataclasses.replace(scheme, **changes)

    if s.method not in METHODS:
        raise UserError(f"auto-quantize method {s.method!r} is unknown; use one of {', '.join(METHODS)}")
    for key in ("num_score_steps", "num_calib_steps"):
        check_positive(key.replace("_", "-"), getattr(s, key))
    if not s.quantization_formats:
        raise UserError(f"scheme {s.name!r} has no quantization formats")
    lowest = min(format_effective_bits(f) for f in s.quantization_formats)  # also validates names
    if not lowest <= s.effective_bits <= 16.0:
        raise UserError(
            f"effective bits {s.effective_bits:g} cannot be reached with {', '.join(s.quantization_formats)}: "
            f"choose a target between {lowest:g} and 16"
        )
    return s
