"""ModelOpt AutoQuantize recipes as schemes.

A recipe (a YAML path, or a built-in name such as ``general/auto_quantize/nvfp4_fp8_at_5p4bits`` or just
``nvfp4_fp8_at_5p4bits``) is loaded and validated by ModelOpt's own loader
(``modelopt.recipe.loader.load_recipe``) and becomes a :class:`Scheme`. Recipes are taken literally:
their ``disabled_layers`` and ``cost_excluded_layers`` are the exclusions (no format-derived ones are
added; ModelOpt's base list does not name ``lm_head``, so a recipe searches it unless it says so).
Candidate formats are named after the ModelOpt preset they equal; a format that is no preset is
registered under ``<recipe>#<index>`` so the search, the manifest and the sweep workers can name it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from auto_quantize_model.configs.recipe_files import check_recipe_file, resolve_recipe_file
from auto_quantize_model.configs.scheme import Scheme
from auto_quantize_model.errors import UserError
from auto_quantize_model.path_names import check_path_name

log = logging.getLogger(__name__)

BUILTIN_AUTO_QUANTIZE_DIR = "general/auto_quantize"
_SUFFIXES = (".yaml", ".yml")


def _builtin_root() -> Any:
    from modelopt.torch.opt.config_loader import BUILTIN_CONFIG_ROOT

    return BUILTIN_CONFIG_ROOT


def find_recipe(ref: str) -> str | None:
    """``ref`` as ModelOpt's loader will resolve it, if it names a recipe file; else None.

    Accepts a file path, a built-in path (``general/auto_quantize/x``, suffix optional) or a bare
    built-in AutoQuantize recipe name (``x``).
    """
    p = Path(ref)
    if p.suffix in _SUFFIXES or p.is_file():
        return ref  # a file path (missing files are the loader's to report)
    root = _builtin_root()
    for cand in (ref, f"{BUILTIN_AUTO_QUANTIZE_DIR}/{ref}"):
        for suffix in ("", *_SUFFIXES):
            if root.joinpath(cand + suffix).is_file():
                return cand + suffix
    return None


def builtin_auto_quantize_recipes() -> list[str]:
    """Names of the AutoQuantize recipes shipped with the installed ModelOpt."""
    folder = _builtin_root().joinpath(BUILTIN_AUTO_QUANTIZE_DIR)
    return sorted(f"{BUILTIN_AUTO_QUANTIZE_DIR}/{e.name.rsplit('.', 1)[0]}" for e in folder.iterdir()
                  if e.name.endswith(_SUFFIXES))


def load_auto_quantize_recipe(ref: str) -> Any:
    """ModelOpt's validated ``ModelOptAutoQuantizeRecipe``; any loader error becomes one line."""
    import yaml
    from modelopt.recipe.config import ModelOptAutoQuantizeRecipe
    from modelopt.recipe.loader import load_recipe
    from omegaconf.errors import OmegaConfBaseException

    # The file ModelOpt would read, checked for size and alias/import expansion before ModelOpt parses it; the
    # checked file itself is what ModelOpt is given.
    resolved = resolve_recipe_file(ref)
    check_recipe_file(ref, resolved)
    try:
        # The loader prints its own "[load_recipe] loading: ..." line; keep stdout for our results.
        with contextlib.redirect_stdout(io.StringIO()):
            recipe = load_recipe(resolved)
    # pydantic's ValidationError is a ValueError; YAML and OmegaConf parse errors have their own bases.
    except (ValueError, TypeError, KeyError, OSError, AssertionError, yaml.YAMLError, OmegaConfBaseException) as exc:
        msg = " ".join(str(exc).split())
        raise UserError(f"recipe {ref} is not a valid ModelOpt AutoQuantize recipe: {msg}") from exc
    if not isinstance(recipe, ModelOptAutoQuantizeRecipe):
        raise UserError(f"recipe {ref} is a {recipe.recipe_type.value} recipe; give an auto_quantize recipe "
                        f"(built-in: {', '.join(builtin_auto_quantize_recipes())})")
    return recipe


def _format_names(stem: str, formats: list[Any]) -> list[str]:
    """Preset names for the recipe's candidate formats (by ModelOpt's own signature), else registered names."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.algorithms import QuantRecipe

    from auto_quantize_model.format_facts import format_signature
    from auto_quantize_model.modelopt_configs import register_quant_config

    presets: dict[str, Any] = {}
    for name in mtq.config.choices:
        with contextlib.suppress(AssertionError, TypeError, ValueError):
            presets.setdefault(format_signature(name), name)
    names = []
    for i, cfg in enumerate(formats):
        data = cfg.model_dump()
        sig = QuantRecipe(data, name=f"{stem}#{i}").checkpoint_signature
        if sig in presets:
            names.append(presets[sig])
        else:
            names.append(register_quant_config(f"{stem}#{i}", data))
    return names


def scheme_from_recipe(ref: str, path: str) -> Scheme:
    """Load ``path`` (found by :func:`find_recipe` for ``ref``) into a Scheme named after its file."""
    stem = Path(path).name.rsplit(".", 1)[0]
    check_path_name(stem, f"recipe {ref}: its scheme name (the file name without suffix)", "rename the recipe file")
    recipe = load_auto_quantize_recipe(path)
    aq = recipe.auto_quantize
    unsupported = [k for k, v in (("quantize (fixed PTQ baseline)", recipe.quantize),
                                  ("module_search_spaces", aq.module_search_spaces), ("kv_cache", aq.kv_cache)) if v]
    if unsupported:
        raise UserError(f"recipe {ref} uses {', '.join(unsupported)}, which autoquant does not run yet; "
                        "use a recipe with candidate_formats only")
    c = aq.constraints
    if c.cost_model != "weight":
        raise UserError(f"recipe {ref} uses the {c.cost_model!r} cost model; a dense Qwen2.5-VL LM needs 'weight'")
    return Scheme(
        name=stem,
        quantization_formats=tuple(_format_names(stem, list(aq.candidate_formats))),
        effective_bits=float(c.effective_bits),
        method=aq.auto_quantize_method,
        score_size=int(aq.score_size),
        disabled_layers=tuple(aq.disabled_layers),
        cost_excluded_layers=tuple(aq.cost_excluded_layers),
        format_exclusions=False,  # a recipe lists its exclusions itself
        cost_exclude_disabled=False,  # ModelOpt's meaning: disabled layers stay in the budget unless listed
        description=recipe.description,
        recipe=ref,
    )
