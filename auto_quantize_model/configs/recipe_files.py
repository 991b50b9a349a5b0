"""Recipe YAML files checked for size and structure before ModelOpt's loader reads them.

ModelOpt's ``load_recipe`` parses with ``yaml.safe_load`` and splices ``$import``-ed snippets; both expand
shared structure without a bound, so a 1 KB file of nested aliases (a "billion laughs" file), or snippets that
import each other many times over, exhaust memory. Here each file the recipe names (itself and every
``imports:`` entry, found the way ModelOpt finds them) is read with a byte cap and composed into YAML nodes
(aliases stay references, nothing is expanded); its size counted with every alias and ``$import`` expanded must
stay under :data:`MAX_EXPANDED_NODES`. Only then is the recipe handed to ModelOpt.

Followed, not copied: ModelOpt 0.47.0 ``modelopt/recipe/loader.py`` ``_resolve_recipe_path`` (built-in library
first, then the file system, ``.yml``/``.yaml`` probed) and ``modelopt/torch/opt/config_loader.py``
``_resolve_config_path`` (imports: file system first, then the built-in library), ``_load_raw_config_with_schema``
(one document, or a header document then the body) and ``_resolve_imports`` (``{$import: name}`` or a list of
names, in dicts and lists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import read_bytes_capped

MAX_RECIPE_BYTES = 256 << 10  # ModelOpt's own recipes are about 2 KB; its snippets smaller
MAX_EXPANDED_NODES = 20_000  # a recipe and its imports, aliases and imports expanded (built-ins: under 300)
MAX_DEPTH = 64
MAX_FILES = 64
_SUFFIXES = (".yml", ".yaml")
_IMPORT_KEY = "$import"
_HINT = "write the recipe without YAML aliases that multiply (or imports that do), as ModelOpt's own recipes are"


def _builtin_root() -> Any:
    from modelopt.torch.opt.config_loader import BUILTIN_CONFIG_ROOT

    return BUILTIN_CONFIG_ROOT


def resolve_recipe_file(ref: str) -> Any:
    """The file ModelOpt's ``load_recipe(ref)`` would read: an absolute ``Path`` or a built-in resource."""
    root = _builtin_root()
    if Path(ref).is_absolute():
        candidates: list[Any] = [Path(ref)]
    else:
        suffixes = ("",) if ref.endswith(_SUFFIXES) else ("", *_SUFFIXES)
        candidates = [root.joinpath(ref + s) for s in suffixes] + [Path(ref + s) for s in suffixes]
    for c in candidates:
        if c.is_dir():
            raise UserError(f"recipe {ref} is a directory; an AutoQuantize recipe is one YAML file")
        if c.is_file():
            return c.absolute() if isinstance(c, Path) else c
    raise UserError(f"recipe {ref} does not exist; give a YAML file path or a built-in recipe name")


def _import_candidates(ref: str) -> list[Any]:
    """Where ModelOpt looks for an ``imports:`` entry, in its order: file system first, then built-in."""
    root = _builtin_root()
    if ref.endswith(_SUFFIXES):
        return [Path(ref), root.joinpath(ref)]
    return [Path(ref + ".yml"), Path(ref + ".yaml"), root.joinpath(ref + ".yml"), root.joinpath(ref + ".yaml")]


def _compose(path: Any, what: str) -> tuple[str, list[Any]]:
    """The text of ``path`` and its YAML documents as nodes (aliases are shared nodes, not copies)."""
    import yaml

    data = read_bytes_capped(path, MAX_RECIPE_BYTES, what, "a recipe is a few KB of YAML")
    try:
        text = data.decode("utf-8")
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return text, list(yaml.compose_all(text, Loader=loader))
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from exc
    except RecursionError as exc:
        raise UserError(f"{what} {path} is nested too deeply; {_HINT}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {' '.join(str(exc).split())}") from exc


def _expanded_nodes(node: Any, memo: dict[int, int], depth: int, where: str) -> int:
    """Nodes under ``node`` with every alias expanded (each distinct node counted once per use, computed once)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if depth > MAX_DEPTH:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels (or an alias refers to itself); {_HINT}")
    n = 1
    if isinstance(node.value, list):
        for item in node.value:
            for child in (item if isinstance(item, tuple) else (item,)):  # mapping items are (key, value) pairs
                n += _expanded_nodes(child, memo, depth + 1, where)
                if n > MAX_EXPANDED_NODES:
                    raise UserError(f"{where} expands to more than {MAX_EXPANDED_NODES:,} YAML nodes; {_HINT}")
    memo[key] = n
    return n


def _imports_of(docs: list[Any]) -> dict[str, Any]:
    """The ``imports:`` mapping of a config's documents (the body's own, else the header's), as ModelOpt merges."""
    header = docs[0] if docs and isinstance(docs[0], dict) else {}
    body = docs[-1] if docs else None
    imports = body.get("imports") if isinstance(body, dict) and "imports" in body else header.get("imports")
    return imports if isinstance(imports, dict) else {}


def _count_with_imports(obj: Any, sizes: dict[str, int], depth: int, where: str) -> int:
    """Items of constructed ``obj``, an ``$import`` counted as the imported file's expanded size."""
    if depth > MAX_DEPTH:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels; {_HINT}")
    n = 1
    if isinstance(obj, dict):
        if _IMPORT_KEY in obj:
            refs = obj[_IMPORT_KEY] if isinstance(obj[_IMPORT_KEY], list) else [obj[_IMPORT_KEY]]
            n += sum(sizes.get(r, 0) for r in refs if isinstance(r, str))
        children = list(obj.values())
    else:
        children = list(obj) if isinstance(obj, list) else []
    for child in children:
        n += _count_with_imports(child, sizes, depth + 1, where)
        if n > MAX_EXPANDED_NODES:
            raise UserError(f"{where} expands to more than {MAX_EXPANDED_NODES:,} entries with its imports; {_HINT}")
    return n


class _Checker:
    """Walks a recipe and its imports; ``sizes`` memoises each file's expanded size by its canonical path."""

    def __init__(self, recipe: str) -> None:
        self.recipe = recipe
        self.sizes: dict[str, int] = {}
        self.loading: set[str] = set()

    def file_size(self, path: Any, depth: int) -> int:
        import yaml

        key = str(path.resolve()) if isinstance(path, Path) else str(path)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.loading:
            raise UserError(f"recipe {self.recipe}: {path} imports itself (circular imports)")
        if len(self.sizes) + len(self.loading) >= MAX_FILES or depth > MAX_DEPTH:
            raise UserError(f"recipe {self.recipe} imports more than {MAX_FILES} files or nests imports too deeply")
        self.loading.add(key)
        where = f"recipe {self.recipe}" + ("" if depth == 0 else f" (imported file {path})")
        text, nodes = _compose(path, "recipe file")
        memo: dict[int, int] = {}
        if sum(_expanded_nodes(d, memo, 0, where) for d in nodes) > MAX_EXPANDED_NODES:
            raise UserError(f"{where} expands to more than {MAX_EXPANDED_NODES:,} YAML nodes; {_HINT}")
        # Bounded now: constructing the documents cannot blow up.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            docs = list(yaml.load_all(text, Loader=loader))
        except yaml.YAMLError as exc:
            raise UserError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from exc
        sizes = {}
        for name, ref in _imports_of(docs).items():
            found = next((c for c in _import_candidates(str(ref)) if c.is_file()), None) if ref else None
            if found is not None:  # a missing import is ModelOpt's to report
                sizes[name] = self.file_size(found, depth + 1)
        total = sum(_count_with_imports(d, sizes, 0, where) for d in docs)
        self.loading.discard(key)
        self.sizes[key] = total
        return total


def check_recipe_file(ref: str, path: Any) -> None:
    """Refuse (one line) a recipe file, or a file it imports, that is too large or expands too far."""
    _Checker(ref).file_size(path, 0)
