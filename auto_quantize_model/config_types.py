"""Type checks for values read from TOML (sweep configs, schemes files) and flags.

TOML gives a string where a user meant a list (``schemes = "a,b"``) or a number (``batch_size = "4"``);
Python would iterate the string character by character or fail deep inside a run. Each check refuses the
value in one line that names the key, what was given and what is expected.
"""

from __future__ import annotations

from typing import Any

from auto_quantize_model.errors import UserError

# Kinds: "str", "int" (no bool, no float), "number" (int or float, no bool), "bool", "list[<kind>]",
# and a trailing "?" for "may be absent/None".
_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
}
_WORDS = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false"}


def _describe(kind: str) -> str:
    if kind.startswith("list["):
        return f"a list of {_WORDS[kind[5:-1]].split(' ', 1)[1]}s (TOML [..., ...])"
    return _WORDS[kind]


def check_value(where: str, key: str, value: Any, kind: str) -> None:
    """Refuse ``value`` unless it is of ``kind`` (see the module's kinds)."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return
    if kind.startswith("list["):
        inner = kind[5:-1]
        ok = isinstance(value, list | tuple) and all(_CHECKS[inner](v) for v in value)
    else:
        ok = _CHECKS[kind](value)
    if not ok:
        raise UserError(f"{where}: {key} must be {_describe(kind)}, got {value!r} ({type(value).__name__}); "
                        "fix its type in the TOML file or flag")


def check_table(where: str, data: dict[str, Any], kinds: dict[str, str]) -> None:
    """Check every known key of ``data`` against ``kinds`` (unknown keys are the caller's business)."""
    for key, value in data.items():
        if key in kinds:
            check_value(where, key, value, kinds[key])
