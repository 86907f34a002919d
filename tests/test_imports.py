"""The project's modules import one another without a cycle, and none imports another module's
private name. Read with ``ast`` (nothing is imported), so that imports inside functions and
under ``if TYPE_CHECKING:`` count as much as those at the top of a file."""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "model", "analysis")


# --- reading the imports -----------------------------------------------------------------------


def project_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every module under the packages (``pkg/__init__.py`` is
    the module ``pkg``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _ancestors(module: str) -> set[str]:
    """The packages that must be imported before ``module`` is: ``a.b.c`` -> ``{a, a.b}``."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _from_module(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names, relative ones resolved."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def read_imports(importer: str, path: Path, modules: dict[str, Path]):
    """``(targets, private)`` of one module: the project modules it imports anywhere in the file
    (a ``from pkg import name`` that names a submodule imports it; the packages above a target
    count, except the importer's own, which are loaded before it is), and the
    ``module._name`` it takes from other project modules."""
    targets, private = set(), set()
    own = _ancestors(importer) | {importer}

    def imports(module: str) -> None:
        targets.update(m for m in (_ancestors(module) | {module}) - own if m in modules)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imports(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = _from_module(node, importer, _is_package(path))
            if source not in modules:
                continue
            imports(source)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    imports(f"{source}.{alias.name}")
                elif _is_private(alias.name) and source != importer:
                    private.add(f"{source}.{alias.name}")
    return targets, private


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(root: Path, packages: tuple[str, ...]):
    """``(graph, private)``: module -> the project modules it imports, and importer -> the
    private names it takes from other modules."""
    modules = project_modules(root, packages)
    graph, private = {}, {}
    for name, path in modules.items():
        graph[name], private[name] = read_imports(name, path, modules)
    return graph, private


# --- what the tests report ---------------------------------------------------------------------


def _shortest_cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every module's shortest import cycle back to itself, as ``a -> b -> a``, each cycle once
    (written from its smallest module)."""
    cycles = set()
    for module in graph:
        cycle = _shortest_cycle_through(module, graph)
        if cycle:
            ring = cycle[:-1]
            first = ring.index(min(ring))
            ring = ring[first:] + ring[:first]
            cycles.add(" -> ".join([*ring, ring[0]]))
    return sorted(cycles)


def private_imports(private: dict[str, set[str]]) -> list[str]:
    """``importer: module._name`` for each private name a module takes from another."""
    return [
        f"{importer}: {name}" for importer in sorted(private) for name in sorted(private[importer])
    ]


# --- the tests ---------------------------------------------------------------------------------


def test_project_modules_import_one_another_without_a_cycle():
    graph, _ = import_graph(ROOT, PACKAGES)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_a_private_name_from_another_module():
    _, private = import_graph(ROOT, PACKAGES)
    offenders = private_imports(private)
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


# The layering docs/architecture.md states: package or module -> what it must not import
# (dotted prefixes: a package forbids its modules too; third-party packages by name), and
# analysis's one window into model.
MODEL_VOCABULARY = ("model.arms", "model.cli", "model.config", "model.geometry", "model.names",
                    "model.presets")  # fmt: skip
MODEL_LAYERS = ("model.data", "model.network", "model.training", "model.evaluation", "model.tools",
                "model.interop", "model.objectives")  # fmt: skip
FORBIDDEN = {
    "model": ("harness", "analysis", "ray", "mlflow"),
    "analysis": ("harness", "ray"),
    # model's top: the vocabulary every layer reads imports none of them.
    **{module: MODEL_LAYERS for module in MODEL_VOCABULARY},
    # The network knows the vocabulary and itself only.
    "model.network": tuple(layer for layer in MODEL_LAYERS if layer != "model.network"),
}
# Packages only their own modules import (the tests aside).
PRIVATE_TO_ITSELF = ("model.tools",)
ANALYSIS_MAY_IMPORT_FROM_MODEL = {"model", "model.arms", "model.names", "model.cli"}


def top_level_imports(path: Path) -> set[str]:
    """Every absolute module a file imports anywhere (``import a.b``, ``from a.b import c``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layering_violations(root: Path) -> list[str]:
    graph, _ = import_graph(root, PACKAGES)
    out = []
    for module, path in project_modules(root, PACKAGES).items():
        package = module.split(".")[0]
        forbidden = [f for key, fs in FORBIDDEN.items() if _within(module, key) for f in fs]
        imported = graph[module] | top_level_imports(path)
        for target in sorted(imported):
            head = target.split(".")[0]
            if any(_within(target, f) for f in forbidden):
                out.append(f"{module} imports {target}")
            elif any(_within(target, p) and not _within(module, p) for p in PRIVATE_TO_ITSELF):
                out.append(f"{module} imports {target}")
            elif package == "analysis" and head == "model":
                if target not in ANALYSIS_MAY_IMPORT_FROM_MODEL:
                    out.append(f"{module} imports {target}")
    return out


def test_each_package_imports_only_what_the_architecture_page_allows():
    violations = layering_violations(ROOT)
    assert not violations, "layering (docs/architecture.md):\n" + "\n".join(violations)


def test_the_layering_check_finds_a_network_module_reaching_up_and_a_tool_imported_elsewhere(
    tmp_path,
):
    files = {
        "model/__init__.py": "",
        "model/config.py": "import model.geometry\n",  # the vocabulary reads itself
        "model/geometry.py": "",
        "model/network/__init__.py": "",
        "model/network/warp.py": "from model.geometry import *\nfrom model.network import head\n",
        "model/network/head.py": "def f():\n    from model.training import loop\n",
        "model/training/__init__.py": "",
        "model/training/loop.py": "from model.tools import bench\n",
        "model/tools/__init__.py": "",
        "model/tools/bench.py": "from model.tools import roofline\nimport model.config\n",
        "model/tools/roofline.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for package in ("harness", "analysis"):
        (tmp_path / package).mkdir()
    assert layering_violations(tmp_path) == [
        "model.network.head imports model.training",
        "model.network.head imports model.training.loop",
        "model.training.loop imports model.tools",
        "model.training.loop imports model.tools.bench",
    ]


def test_the_checks_find_a_cycle_through_a_function_import_and_a_private_import(tmp_path):
    files = {
        # The package imports a submodule: its submodules importing it as their parent is no cycle.
        "pkg/__init__.py": "from pkg.a import thing\n",
        "pkg/a.py": "from pkg.b import helper\nthing = helper\n",
        "pkg/b.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                import pkg.c
            def helper():
                from pkg import a  # the submodule: pkg.b -> pkg.a -> pkg.b
                return a
            def _secret():
                pass
            """,
        "pkg/c.py": "from .b import _secret, helper\nfrom . import __doc__\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    graph, private = import_graph(tmp_path, ("pkg",))
    assert import_cycles(graph) == ["pkg.a -> pkg.b -> pkg.a", "pkg.b -> pkg.c -> pkg.b"]
    assert private_imports(private) == ["pkg.c: pkg.b._secret"]
