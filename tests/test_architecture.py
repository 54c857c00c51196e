"""Layering: core/ is framework-free and imports neither service nor workers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_neither_service_nor_workers():
    """No module under core/ imports service, workers, starlette or uvicorn."""
    offenders = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in {"service", "workers", "starlette", "uvicorn", "emulator"}:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_no_relative_imports_anywhere():
    """Every import names its layer (absolute imports only)."""
    offenders = []
    for package in ("core", "service", "workers", "emulator"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level > 0
            ]
    assert offenders == []


def test_no_pickle_anywhere():
    """The queue carries JSON: nothing in the project imports pickle."""
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("core", "service", "workers", "emulator")
        for path in (ROOT / package).rglob("*.py")
        if any(name.split(".")[0] in {"pickle", "cPickle", "dill"} for name in imported_modules(path))
    ]
    assert offenders == []
