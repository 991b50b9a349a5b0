"""Quantization configs by name: ModelOpt's presets plus this project's custom ones.

``auto_quantize`` ignores name-pattern disables inside a format config (it decides per layer), but
``mtq.quantize`` does not. ``FP8_ALL_LAYERS_CFG`` is ModelOpt's FP8 recipe with its default name-pattern
exclusions (``*lm_head*``, ``*visual*``, routers, ...) removed, so the same config quantizes every
Linear whether it is used for a search or applied directly, including vision blocks.
"""

from __future__ import annotations

import copy
from typing import Any

from auto_quantize_model.errors import UserError


def _fp8_all_layers() -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    base = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    keep = [
        e
        for e in base["quant_cfg"]
        if e.get("quantizer_name") in ("*", "*weight_quantizer", "*input_quantizer") and "parent_class" not in e
    ]
    return {"quant_cfg": keep, "algorithm": base["algorithm"]}


FP8_ALL_LAYERS_CFG: dict[str, Any] = _fp8_all_layers()

CUSTOM_QUANT_CONFIGS: dict[str, dict[str, Any]] = {
    "FP8_ALL_LAYERS_CFG": FP8_ALL_LAYERS_CFG,
}
# The custom names defined here (recipes may register more at run time; format_facts.py never caches those).
BUILTIN_CUSTOM = frozenset(CUSTOM_QUANT_CONFIGS)


def register_quant_config(name: str, config: dict[str, Any]) -> str:
    """Make a recipe's custom format resolvable by name in this process; returns ``name``.

    Re-registering a name with a different config is refused: names must identify one format.
    """
    known = CUSTOM_QUANT_CONFIGS.get(name)
    if known is not None and known != config:
        raise UserError(f"quant config name {name!r} is already used by another format; rename the recipe file")
    CUSTOM_QUANT_CONFIGS[name] = copy.deepcopy(config)
    return name


def modelopt_preset_names() -> list[str]:
    """Names of ModelOpt's own quantization presets."""
    import modelopt.torch.quantization as mtq

    return sorted(mtq.config.choices)


def available_quant_configs() -> list[str]:
    """Every name ``--quant-config`` accepts."""
    return sorted(set(modelopt_preset_names()) | set(CUSTOM_QUANT_CONFIGS))


def resolve_quant_config(name: str) -> dict[str, Any]:
    """Return a deep copy of the named config (custom names first, then ModelOpt presets)."""
    import modelopt.torch.quantization as mtq

    if name in CUSTOM_QUANT_CONFIGS:
        return copy.deepcopy(CUSTOM_QUANT_CONFIGS[name])
    if name in mtq.config.choices:
        return copy.deepcopy(getattr(mtq.config, name))
    raise UserError(
        f"unknown quant config {name!r}; use a ModelOpt preset or a custom name "
        f"(`autoquant schemes --quant-configs` lists all {len(available_quant_configs())})"
    )
