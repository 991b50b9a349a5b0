"""Settings declared once: each dataclass field carries its help, kind, flag and allowed range.

``setting(...)`` is a ``dataclasses.field`` whose metadata says what the setting is (help text, a
``config_types`` kind, its command-line flag or why it has none, and its range). From those fields this
module generates everything that used to be written by hand for each setting: the argparse flags
(``add_arguments``), the overrides a command line gives (``overrides_from_args``; ``None`` = not given),
the check of a TOML table's keys (``check_keys``) and the type and range checks a settings object runs
on itself when it is built (``validate_settings``, called from ``__post_init__``), whether its values
came from TOML, flags or Python.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any

from auto_quantize_model.config_types import check_value
from auto_quantize_model.errors import UserError

_META = "autoquant.setting"
_FLAG_TYPES = {"int": int, "number": float}


@dataclass(frozen=True)
class Setting:
    """What one field of a settings dataclass is, beyond its Python type."""

    help: str
    kind: str  # a config_types kind ("int", "str?", "list[number]"), or "table" for a nested settings dataclass
    flag: str | None = None  # "--batch-size"; None: TOML only, for the reason in ``toml_only``
    toml_only: str | None = None
    positive: bool = False  # > 0 (every entry, for a list)
    minimum: float | None = None  # >= minimum
    choices: tuple[str, ...] = ()
    nonempty: bool = False  # a list with at least one entry
    note: str = ""  # said with a range error: what the boundary means, or how to fix it
    table: type | None = None  # the nested settings dataclass of a "table" setting


def setting(default: Any = MISSING, *, help: str, kind: str, flag: str | None = None, toml_only: str | None = None,
            positive: bool = False, minimum: float | None = None, choices: tuple[str, ...] = (),
            nonempty: bool = False, note: str = "") -> Any:
    """A dataclass field declaring one setting; give exactly one of ``flag`` and ``toml_only`` (the reason)."""
    if (flag is None) == (toml_only is None):
        raise ValueError(f"a setting has a flag or says why it is TOML-only, not both or neither ({help!r})")
    if flag is not None and not flag.startswith("--"):
        raise ValueError(f"flag {flag!r} must start with --")
    meta = Setting(help=help, kind=kind, flag=flag, toml_only=toml_only, positive=positive, minimum=minimum,
                   choices=tuple(choices), nonempty=nonempty, note=note)
    return dataclasses.field(default=default, metadata={_META: meta})


def table(cls: type, *, help: str) -> Any:
    """A field holding a nested settings dataclass (a TOML table such as ``[worker]``); its fields have flags
    or reasons of their own."""
    meta = Setting(help=help, kind="table", toml_only="a TOML table; its settings are declared on their own",
                   table=cls)
    return dataclasses.field(default_factory=cls, metadata={_META: meta})


def same_as(cls: type, name: str) -> Any:
    """A new field declaring ``cls``'s setting ``name`` again (same default, help, flag and range), for a
    settings class that repeats another's setting under the same name."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def settings_of(cls: type) -> list[tuple[dataclasses.Field, Setting]]:
    """``(field, Setting)`` of every declared setting of dataclass ``cls``, in field order."""
    return [(f, f.metadata[_META]) for f in dataclasses.fields(cls) if _META in f.metadata]


def required_settings(cls: type) -> list[tuple[str, Setting]]:
    """``(name, Setting)`` of the settings without a default."""
    return [(f.name, s) for f, s in settings_of(cls) if f.default is MISSING and f.default_factory is MISSING]


def _leaves(cls: type, table_name: str = "") -> list[tuple[str, str, Setting]]:
    """``(table, name, Setting)`` of every non-table setting of ``cls``, nested tables included."""
    out = []
    for f, s in settings_of(cls):
        if s.table is not None:
            out += _leaves(s.table, f"{table_name}.{f.name}" if table_name else f.name)
        else:
            out.append((table_name, f.name, s))
    return out


def describe_toml(cls: type) -> str:
    """For a command's help: how its flags map to TOML keys, and which settings are TOML-only."""
    text = "TOML keys are the settings' names with underscores (--batch-size: batch_size)"
    renamed = [f"{s.flag} is {name} in [{t}]" if t else f"{s.flag} is {name}"
               for t, name, s in _leaves(cls) if s.flag and (t or _dest(s.flag) != name)]
    only: dict[str, list[str]] = {}
    for t, name, s in _leaves(cls):
        if s.flag is None:
            only.setdefault(t, []).append(name)
    if renamed:
        text += "; " + ", ".join(renamed)
    if only:
        text += ". TOML only: " + "; ".join(f"[{t}] " + ", ".join(n) if t else ", ".join(n) for t, n in only.items())
    return text + "."


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def add_arguments(parser: Any, cls: type, *, defaults: bool = False) -> None:
    """One flag per setting of ``cls`` (nested tables included) that has one, on ``parser`` (a parser or group).

    ``defaults=False``: an absent flag parses as ``None`` (a TOML file or the dataclass default decides);
    ``defaults=True``: as the field's default (commands without a TOML layer). Lists are given
    comma-separated and parsed by ``overrides_from_args``, so a bad entry is a one-line ``UserError``.
    """
    for f, s in settings_of(cls):
        if s.table is not None:
            add_arguments(parser, s.table, defaults=defaults)
            continue
        if s.flag is None:
            continue
        default = f.default if defaults and f.default is not MISSING else None
        kind = s.kind.rstrip("?")
        if kind == "bool":
            parser.add_argument(s.flag, dest=_dest(s.flag), action="store_true", default=default, help=s.help)
        elif kind.startswith("list["):
            parser.add_argument(s.flag, dest=_dest(s.flag), default=default, help=s.help)
        else:
            parser.add_argument(s.flag, dest=_dest(s.flag), type=_FLAG_TYPES.get(kind), default=default,
                                choices=s.choices or None, help=s.help)


def _parse_list(flag: str, text: str, s: Setting) -> tuple[Any, ...]:
    """Comma-separated entries of ``list[...]`` setting ``s``; ints refuse ``2.5`` rather than truncate it. A flag
    given with no entry (``--schemes ,``) is an empty list, never "not given": refused where a list must hold one."""
    inner = s.kind.rstrip("?")[5:-1]
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts and s.nonempty:
        raise UserError(f"{flag} {text!r} names nothing; {s.note or 'give at least one entry'}, or leave the flag out")
    if inner == "str":
        return tuple(parts)
    try:
        return tuple(_FLAG_TYPES[inner](x) for x in parts)
    except ValueError as exc:
        what = "whole numbers" if inner == "int" else "numbers"
        raise UserError(f"{flag}: expected comma-separated {what}, got {text!r}") from exc


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` given on the command line, by setting name (``None`` = not given); a nested
    table is a dict of its given settings, or ``None`` when none was given."""
    out: dict[str, Any] = {}
    for f, s in settings_of(cls):
        if s.table is not None:
            nested = {k: v for k, v in overrides_from_args(args, s.table).items() if v is not None}
            out[f.name] = nested or None
        elif s.flag is not None:
            value = getattr(args, _dest(s.flag), None)
            if isinstance(value, str) and s.kind.startswith("list["):
                value = _parse_list(s.flag, value, s)
            out[f.name] = value
    return out


def check_keys(where: str, data: dict[str, Any], cls: type, table_name: str = "") -> None:
    """Refuse keys of ``data`` that are no setting of ``cls`` (nested tables too), listing the allowed ones."""
    known = {f.name: s for f, s in settings_of(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        place = f" in [{table_name}]" if table_name else ""
        raise UserError(f"unknown {where}s{place} {unknown}; allowed: {sorted(known)}")
    for key, value in data.items():
        s = known[key]
        if s.table is not None and isinstance(value, dict):
            check_keys(where, value, s.table, f"{table_name}.{key}" if table_name else key)


def _normalized(value: Any, kind: str) -> Any:
    """Lists as tuples (frozen, hashable); numbers as floats (TOML's 12 and 12.0 are one setting)."""
    if value is None:
        return None
    base = kind.rstrip("?")
    if base.startswith("list["):
        return tuple(float(v) for v in value) if base == "list[number]" else tuple(value)
    return float(value) if base == "number" else value


def _range_error(where: str, key: str, value: Any, s: Setting, given: Any) -> str | None:
    """Why ``value`` (normalized) is out of ``s``'s range, or None; the message shows the value as ``given``."""
    entries = value if isinstance(value, tuple) else (value,)
    rule = None
    if s.nonempty and not entries:
        rule = "a non-empty list"
    elif s.positive and any(v <= 0 for v in entries):
        rule = "positive" if not isinstance(value, tuple) else "a list of positive numbers"
    elif s.minimum is not None and any(v < s.minimum for v in entries):
        rule = f">= {s.minimum:g}"
    elif s.choices and any(v not in s.choices for v in entries):
        rule = f"one of {', '.join(s.choices)}"
    if rule is None:
        return None
    return f"{where} {key} must be {rule}, got {given!r}" + (f" ({s.note})" if s.note else "")


def validate_settings(obj: Any, where: str, prefix: str = "") -> None:
    """Check every setting of the dataclass instance ``obj`` (type, then range) and store it normalized
    (lists as tuples, numbers as floats, a nested table's dict as its dataclass). Raises one-line ``UserError``s
    that name the setting as ``prefix + name``. Call it first thing in ``__post_init__``."""
    for f, s in settings_of(type(obj)):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if s.table is not None:
            if isinstance(value, dict):
                check_keys(where, value, s.table, key)
                value = s.table(**value)
            elif not isinstance(value, s.table):
                raise UserError(f"{where} {key} must be a [{key}] table, got {value!r}")
        else:
            if value is None and s.kind.endswith("?"):
                continue
            check_value(where, key, value, s.kind)
            given, value = value, _normalized(value, s.kind)
            problem = _range_error(where, key, value, s, given)
            if problem:
                raise UserError(problem)
        object.__setattr__(obj, f.name, value)  # frozen dataclasses too: this is their own __post_init__
