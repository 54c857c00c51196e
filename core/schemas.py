"""The JSON Schemas (draft 2020-12) of what the service writes for other services to read: the
installed package's ``schema_files/``, else the checkout's ``schemas/`` (docs/consumers.md)."""

from __future__ import annotations

import json
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

NAMES = (
    "output-entry",
    "output-payload",
    "signal",
    "vehicle",
    "parked-entry",
    "vehicle-state",
    "vehicle-state-report",
)
SUFFIX = ".schema.json"


def schema_folder() -> Traversable:
    packaged = files("core") / "schema_files"  # where the wheel puts them (pyproject.toml)
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "schemas"


def load_schema(name: str) -> dict[str, Any]:
    """The schema called ``name`` (one of :data:`NAMES`), as a JSON object."""
    if name not in NAMES:
        raise KeyError(f"No schema is called {name!r}; the names are {', '.join(NAMES)}.")
    schema: dict[str, Any] = json.loads((schema_folder() / f"{name}{SUFFIX}").read_text(encoding="utf-8"))
    return schema


def load_all() -> dict[str, dict[str, Any]]:
    """Every schema, by name: a validator needs them all to resolve the references between them."""
    return {name: load_schema(name) for name in NAMES}
