"""Checking a JSON value against a TypedDict (the record types of ``records/``): missing required keys, undeclared
keys, values of the wrong JSON type, each named by its path."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict


def check_typed(value: Any, tp: Any, where: str, problems: list[str]) -> None:
    """Append to ``problems`` every way ``value`` differs from the type ``tp`` (``where`` names its path)."""
    origin = get_origin(tp)
    if tp is Any:
        return
    if is_typeddict(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        hints = get_type_hints(tp)
        required = tp.__required_keys__
        problems.extend(f"{where}.{k}: missing" for k in sorted(required - value.keys()))
        owner = f"{tp.__module__.removeprefix('auto_quantize_model.')}.{tp.__name__}"
        problems.extend(f"{where}.{k}: not declared in {owner}" for k in sorted(value.keys() - hints.keys()))
        for k in value.keys() & hints.keys():
            check_typed(value[k], hints[k], f"{where}.{k}", problems)
    elif origin in (Union, types.UnionType):
        for alt in get_args(tp):
            sub: list[str] = []
            check_typed(value, alt, where, sub)
            if not sub:
                return
        problems.append(f"{where}: {value!r:.60} is none of {tp}")
    elif origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {get_args(tp)}")
    elif origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            check_typed(item, get_args(tp)[0], f"{where}[{i}]", problems)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for k, item in value.items():
            check_typed(item, get_args(tp)[1], f"{where}[{k!r}]", problems)
    elif tp is type(None):
        if value is not None:
            problems.append(f"{where}: expected null, got {value!r:.60}")
    elif tp is float:
        # JSON writes 12.0 as 12.0 but a sum of ints may arrive as an int: both are numbers; bool is not.
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"{where}: expected a number, got {value!r:.60}")
    elif tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{where}: expected an integer, got {value!r:.60}")
    elif isinstance(tp, type):
        if not isinstance(value, tp):
            problems.append(f"{where}: expected {tp.__name__}, got {value!r:.60}")
    else:  # pragma: no cover - a type form this checker does not know is a bug in this module
        raise TypeError(f"records.typed_json cannot check {tp!r} at {where}")
