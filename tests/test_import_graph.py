"""The package's import graph (read with ast, nothing imported): layers, no cycle, and the worker's settings.

Every import counts, at module level or inside a function: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "auto_quantize_model"

# Lowest first. A module may import its own unit or any unit of a lower rank; units of one rank never
# import each other. A unit is a top-level module or a sub-package of auto_quantize_model.
LAYERS = [
    ["errors"],
    ["safetensors_header"],  # the checkpoint files' header check, shared by preflight and the loader (no torch)
    ["io_utils", "config_types", "modelopt_configs", "provenance", "logs", "preflight", "path_names", "timing"],
    # setting fields over config_types' kinds (actors' and sweep's settings); formats' facts over modelopt_configs
    ["settings", "format_facts"],
    ["records"],
    ["datasets", "configs"],
    ["models"],
    ["autoquant"],
    ["export"],
    ["inference"],
    ["analysis"],
    ["actors"],
    ["sweep"],
    ["demo"],
    ["cli"],
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
ROOT = "(package)"  # auto_quantize_model/__init__.py: the public API, above everything
RANK[ROOT] = len(LAYERS)


def _module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, eager_only: bool = False, pkg: Path = PKG) -> set[str]:
    """auto_quantize_model modules ``path`` imports (``from pkg import name`` counts as pkg.name if a module);
    ``eager_only``: only the imports run when the module is imported (its top-level statements)."""
    found = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in (tree.body if eager_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "auto_quantize_model"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "auto_quantize_model":
                continue
            found.add(node.module)
            for a in node.names:
                sub = pkg.parent / (node.module.replace(".", "/") + "/" + a.name)
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    found.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the package uses absolute imports only")
    return found


def import_graph(pkg: Path = PKG, eager_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package importing its own submodules is no edge)."""
    graph = {}
    for p in sorted(pkg.rglob("*.py")):
        mod = _module_name(p, pkg)
        graph[mod] = {t for t in _imports(p, eager_only, pkg) if t != mod}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in graph.items():
        for target in sorted(targets):
            a, b = _unit(mod), _unit(target)
            if a == b:
                continue
            if a not in RANK or b not in RANK:
                bad.append(f"{mod} -> {target}: unit {a if a not in RANK else b!r} has no layer in LAYERS")
            elif RANK[b] >= RANK[a]:
                bad.append(f"{mod} -> {target}: {b} is not below {a}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in import_graph()}
    assert units - set(RANK) == set(), "add new packages/modules to LAYERS"


def test_no_upward_import():
    # Old code: actors.worker -> cli, sweep.spec and analysis.tables; inference.controls -> analysis.tables;
    # export.hf -> inference.rebuild.
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    # Old code: cli -> demo -> sweep -> actors -> cli (the worker imported cli's setup_logging).
    assert cycles(import_graph(eager_only=True)) == []
    # Imports inside functions count too. Old code: configs.schemes -> configs.recipes (get_scheme's recipe
    # fallback, lazy) -> configs.schemes (scheme_from_recipe built a Scheme, lazy).
    assert cycles(import_graph()) == []


def test_a_cycle_closed_by_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "auto_quantize_model"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "configs" / "a.py").write_text("from auto_quantize_model.configs import b\n")
    (pkg / "configs" / "b.py").write_text("def f():\n    from auto_quantize_model.configs.a import x\n")
    assert cycles(import_graph(pkg, eager_only=True)) == []
    assert cycles(import_graph(pkg)) == [["auto_quantize_model.configs.a", "auto_quantize_model.configs.b"]]


def test_no_cycle_between_units():
    graph = import_graph()
    units: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        units.setdefault(f"auto_quantize_model.{_unit(mod)}", set()).update(
            f"auto_quantize_model.{_unit(t)}" for t in targets if _unit(t) != _unit(mod))
    assert cycles(units) == []


def test_actors_import_no_cli_sweep_or_analysis():
    graph = import_graph()
    bad = [(m, t) for m, ts in graph.items() if _unit(m) == "actors" for t in ts
           if _unit(t) in ("cli", "sweep", "analysis")]
    assert bad == []


def test_checks_catch_a_cycle_and_an_upward_import():
    graph = {"auto_quantize_model.actors.worker": {"auto_quantize_model.cli"},
             "auto_quantize_model.cli": {"auto_quantize_model.actors.worker"}}
    assert cycles(graph) == [["auto_quantize_model.actors.worker", "auto_quantize_model.cli"]]
    assert upward_imports(graph) == ["auto_quantize_model.actors.worker -> auto_quantize_model.cli: cli is not "
                                     "below actors"]


def _spec_reads(path: Path) -> set[str]:
    """Attribute names read as ``self.spec.<name>`` in ``path``."""
    tree = ast.parse(path.read_text())
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "spec" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_worker_spec_declares_what_actors_read_as_the_sweep_spec_does():
    from auto_quantize_model.actors.settings import WorkerSpec
    from auto_quantize_model.sweep.spec import SweepSpec

    mine = {f.name: f for f in dataclasses.fields(WorkerSpec)}
    reads = set().union(*(_spec_reads(p) for p in (PKG / "actors").glob("*.py")))
    assert reads and reads <= set(mine) | {n for n in dir(WorkerSpec) if not n.startswith("_")}
    sweep = {f.name: f for f in dataclasses.fields(SweepSpec)}
    for name, f in mine.items():
        assert name in sweep, f"WorkerSpec.{name} is not a sweep setting"
        assert (f.type, f.default, f.default_factory) == (sweep[name].type, sweep[name].default,
                                                          sweep[name].default_factory), name


def test_worker_spec_from_sweep_dict_keeps_the_workers_settings(tiny_model_dir):
    from auto_quantize_model.actors.settings import WorkerSettings, WorkerSpec
    from auto_quantize_model.sweep.spec import load_sweep_spec

    spec = load_sweep_spec(None, {"name": "s", "model_dir": str(tiny_model_dir), "seed": 3, "evaluate": True,
                                  "worker": {"num_gpus": 0, "pristine": "cpu"}})
    ws = WorkerSpec.from_sweep_dict(spec.to_dict())
    assert (ws.name, ws.model_dir, ws.seed, ws.evaluate) == ("s", str(tiny_model_dir), 3, True)
    assert ws.worker == WorkerSettings(num_gpus=0, pristine="cpu") == spec.worker
    # Trials carry their scheme resolved on the driver: a worker has no schemes file to read.
    assert "schemes_file" not in {f.name for f in dataclasses.fields(WorkerSpec)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ws.seed = 4  # type: ignore[misc]
