"""What the sweep driver needs to know about a quantization format, without importing ModelOpt every time.

Resolving a grid (scoring keys, shared passes, exclusions, budget checks) needs four facts per format: the bits
ModelOpt's cost model charges, ModelOpt's canonical signature, the calibration algorithm and the format's
name-pattern layer disables. Computing them imports ModelOpt (7 s on the CPU machine, more beside a GPU), which
is most of what a sweep's driver does before it connects to Ray. The facts are remembered in a small JSON file
keyed by everything they derive from: the installed ModelOpt (version, plus size and mtime of its config and
recipe-algorithm modules, read without importing it) and the source of this project's modules that derive them.
A mismatch recomputes them. Formats that a recipe registered in this process under any name are never read from
the file: the name alone does not identify their config.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from auto_quantize_model.io_utils import atomic_write_json, user_cache_file

log = logging.getLogger(__name__)
FACTS_VERSION = 1
# The modules whose code turns a ModelOpt config into these facts (their source is part of the stamp).
_DERIVING_MODULES = ("modelopt_configs.py", "format_facts.py")
_MODELOPT_FILES = ("torch/quantization/config.py", "torch/quantization/algorithms.py")


@dataclass(frozen=True)
class FormatFacts:
    """One format, as the driver sees it."""

    effective_bits: float  # bits per weight in ModelOpt's cost model (FP8: 8, NVFP4: ~4.5)
    signature: str  # ModelOpt's canonical identity of the format (QuantRecipe.checkpoint_signature)
    algorithm: str | None  # calibration algorithm (max, smoothquant, awq_lite, ...)
    disable_patterns: tuple[str, ...]  # the format's name-pattern layer disables (quantizer-name globs)


def _is_layer_disable(entry: Any) -> bool:
    """A config entry that switches quantization off for layers chosen by name (not by class)."""
    pattern = entry.get("quantizer_name")
    if entry.get("enable", True) is not False or entry.get("parent_class") or not isinstance(pattern, str):
        return False
    # ``*`` is the "everything off, then enable below" base; ``*..._quantizer`` entries address one
    # quantizer of every layer (KV cache, output), which is a format choice, not a layer exclusion.
    return pattern != "*" and "quantizer" not in pattern


def format_disable_patterns(config: dict[str, Any]) -> list[str]:
    """The name-pattern disables of one format config, in the config's order (quantizer-name globs)."""
    return [e["quantizer_name"] for e in config.get("quant_cfg", []) if isinstance(e, dict) and _is_layer_disable(e)]


def _cache_path() -> Path:
    return user_cache_file("AUTOQUANT_FORMAT_CACHE", "format-facts.json")


@functools.cache
def stamp() -> str:
    """What the facts derive from: installed ModelOpt and this project's deriving code (no ModelOpt import).
    Computed once per process: the grid asks for facts per format and trial."""
    spec = importlib.util.find_spec("modelopt")  # finds the package without running it
    parts: list[str] = [f"facts v{FACTS_VERSION}"]
    try:
        parts.append(f"nvidia-modelopt {metadata.version('nvidia-modelopt')}")
    except metadata.PackageNotFoundError:
        parts.append("nvidia-modelopt ?")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for rel in _MODELOPT_FILES:
        for root in roots:
            path = Path(root) / rel
            if path.is_file():
                st = path.stat()
                parts.append(f"{path}|{st.st_size}|{st.st_mtime_ns}")
    here = Path(__file__).resolve().parent
    for rel in _DERIVING_MODULES:
        parts.append(hashlib.sha256((here / rel).read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _compute(name: str) -> FormatFacts:
    from modelopt.torch.quantization.algorithms import QuantRecipe

    from auto_quantize_model.modelopt_configs import resolve_quant_config

    config = resolve_quant_config(name)  # refuses an unknown name in one line
    recipe = QuantRecipe(config, name=name)
    algo = config.get("algorithm")
    if isinstance(algo, dict):
        algo = algo.get("method")
    return FormatFacts(effective_bits=float(recipe.compression * 16), signature=recipe.checkpoint_signature,
                       algorithm=algo, disable_patterns=tuple(format_disable_patterns(config)))


def _registered_at_runtime(name: str) -> bool:
    """A recipe registered this name in this process (only possible once modelopt_configs is imported)."""
    configs = sys.modules.get("auto_quantize_model.modelopt_configs")
    return configs is not None and name in configs.CUSTOM_QUANT_CONFIGS and name not in configs.BUILTIN_CUSTOM


_MEMO: dict[tuple[str, str], FormatFacts] = {}


def format_facts(name: str) -> FormatFacts:
    """The facts of the named format: from the file when its stamp matches, else computed (and remembered)."""
    if _registered_at_runtime(name):
        return _compute(name)
    key = (stamp(), name)
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or data.get("stamp") != key[0]:
        data = {"stamp": key[0], "formats": {}}
    entry = data["formats"].get(name)
    if isinstance(entry, dict):
        try:
            facts = FormatFacts(**{**entry, "disable_patterns": tuple(entry["disable_patterns"])})
        except (TypeError, KeyError):
            facts = None
        if facts is not None:
            _MEMO[key] = facts
            return facts
    facts = _compute(name)
    data["formats"][name] = asdict(facts)
    try:
        atomic_write_json(path, data)
    except OSError as exc:  # a read-only home only costs the next process the ModelOpt import
        log.debug("could not write the format facts cache %s: %s", path, exc)
    _MEMO[key] = facts
    return facts


def format_effective_bits(name: str) -> float:
    """Bits per weight ModelOpt's cost model charges for the named format (FP8: 8, NVFP4: ~4.5)."""
    return format_facts(name).effective_bits


def format_signature(name: str) -> str:
    """ModelOpt's canonical identity of the named format, used to name formats in search results."""
    return format_facts(name).signature


def format_algorithm(name: str) -> str | None:
    """The calibration algorithm of the named format (``max``, ``smoothquant``, ``awq_lite``, ...)."""
    return format_facts(name).algorithm


def format_folds_weights(name: str) -> bool:
    """SmoothQuant and AWQ calibrate a ``pre_quant_scale`` that ModelOpt folds into ``linear.weight``."""
    algo = format_algorithm(name) or ""
    return "smoothquant" in algo or "awq" in algo
