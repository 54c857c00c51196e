"""Layering and size, read from the source (AST), so a violation fails here rather than in review.

core/ is framework-free and shared by every process; service/ (the web edge), workers/ (RQ) and
cli/ (the commands, which start the other two) build on it; the emulator stands apart, talking to
the service only over HTTP. Inside core/, the concept packages (core.redis, core.smartcar,
core.store) and the plain modules may use one another, but never in a circle.
"""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The project's own top-level packages.
PROJECT = ("core", "service", "workers", "cli", "emulator")
#: Longest module allowed under core/, service/, workers/ and cli/, in lines.
MAX_MODULE_LINES = 400
#: Modules allowed past :data:`MAX_MODULE_LINES`, each with the reason; a module leaves this list
#: as soon as it is back under the limit (the size test says so).
LONG_MODULES: dict[str, str] = {}


def python_files(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    """``core.redis.keys`` for core/redis/keys.py, ``core.redis`` for core/redis/__init__.py."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it: ``from a import b`` counts as ``a`` and, when
    ``b`` is a module of the project, ``a.b`` too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
    return names


def imports_of(packages: tuple[str, ...], forbidden: set[str]) -> list[str]:
    """``"file imports module"`` for each import, under ``packages``, of a top-level name in ``forbidden``."""
    return [
        f"{relative(path)} imports {name}"
        for path in python_files(*packages)
        for name in sorted(imported_modules(path))
        if name.split(".")[0] in forbidden
    ]


def test_core_imports_no_other_layer_and_no_web_framework():
    """Nothing under core/ imports service, workers, cli, the emulator, the tests, starlette or uvicorn."""
    forbidden = {"service", "workers", "cli", "emulator", "tests", "starlette", "uvicorn"}
    assert imports_of(("core",), forbidden) == []


def test_workers_import_neither_service_nor_cli():
    """The worker process never loads the web edge or the command line."""
    assert imports_of(("workers",), {"service", "cli"}) == []


def test_service_imports_neither_workers_nor_cli():
    """The web process never loads the worker or the command line."""
    assert imports_of(("service",), {"workers", "cli"}) == []


def test_cli_imports_no_tests():
    """The commands may use every part of the project, but never the test suite."""
    assert imports_of(("cli",), {"tests"}) == []


def test_emulator_imports_nothing_of_the_project():
    """The emulator stands in for Smartcar, so it shares no code with the service it serves."""
    assert imports_of(("emulator",), {"core", "service", "workers", "cli"}) == []


def core_unit(module: str) -> str | None:
    """The unit of core/ that ``module`` belongs to: ``core.redis`` for ``core.redis.keys``,
    ``core.config`` for ``core.config``; ``None`` outside core/ and for ``core`` itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "core" and len(parts) > 1 else None


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (each node maps to what it imports) as ``[a, b, …, a]``, each node
    importing the next; ``None`` when the graph is acyclic."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        # graphlib lists the cycle the other way round: each node is imported by the next.
        return list(reversed(error.args[1]))
    return None


def test_core_packages_and_modules_import_each_other_without_a_cycle():
    """The units of core/ (concept packages and plain modules) form an acyclic import graph."""
    graph: dict[str, set[str]] = defaultdict(set)
    because: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in python_files("core"):
        source = core_unit(module_name(path))
        if source is None:
            continue
        graph.setdefault(source, set())  # a unit that imports nothing of core/ is still a node
        for name in imported_modules(path):
            target = core_unit(name)
            if target is not None and target != source:
                graph[source].add(target)
                because[source, target].append(f"{relative(path)} imports {name}")
    assert {"core.redis", "core.smartcar", "core.store"} <= set(graph)
    cycle = import_cycle(graph)
    assert cycle is None, (" -> ".join(cycle), [because[edge] for edge in pairwise(cycle)])


def test_no_module_is_longer_than_the_limit():
    """Modules under core/, service/, workers/ and cli/ stay within MAX_MODULE_LINES, but for LONG_MODULES."""
    lengths = {
        relative(path): len(path.read_text().splitlines()) for path in python_files("core", "service", "workers", "cli")
    }
    too_long = {name: lines for name, lines in lengths.items() if lines > MAX_MODULE_LINES and name not in LONG_MODULES}
    assert too_long == {}, f"split these, or add them to LONG_MODULES with the reason: {too_long}"
    back_under = {name: lengths.get(name) for name in LONG_MODULES if lengths.get(name, 0) <= MAX_MODULE_LINES}
    assert back_under == {}, f"no longer too long (or gone): remove them from LONG_MODULES: {back_under}"


def test_no_relative_imports_anywhere():
    """Every import names its layer (absolute imports only)."""
    offenders = [
        f"{relative(path)}:{node.lineno}"
        for path in python_files(*PROJECT)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert offenders == []


def test_no_pickle_anywhere():
    """The queue carries JSON: nothing in the project imports pickle."""
    assert imports_of(PROJECT, {"pickle", "cPickle", "_pickle", "dill", "cloudpickle"}) == []
