"""The JSON Schemas (draft 2020-12) of what the service writes for other services to read.

==========================  ======================================================================
name                        describes
==========================  ======================================================================
``output-entry``            an entry of ``OUTPUT_STREAM``: its fields; ``payload`` is JSON text
``output-payload``          that ``payload`` document, by ``schemaVersion`` (1 and 2)
``signal``                  one signal, as in ``signals``, ``latestSignals`` and the vehicle state
``vehicle``                 the payload's ``vehicle`` and the vehicle state's ``_vehicle``
``parked-entry``            an entry of ``PARKED_STREAM``
``vehicle-state``           a vehicle's state hash (``VEHICLE_STATE_PREFIX`` + vehicle id)
``vehicle-state-report``    what ``smartcar-ingest vehicle-state ID --json`` prints
==========================  ======================================================================

The repository keeps them in its top-level ``schemas/`` folder as ``<name>.schema.json``; the
wheel carries the same files as ``core/schema_files/`` (pyproject.toml), so an installed package
reads them here without the repository. Each file's ``$id`` is
``https://smartcar-ingest.invalid/schemas/<name>.schema.json``: a name, not an address (nothing is
served there). Files refer to one another by those names, so a validator must be given all of them
(:func:`load_all`). Fields that hold JSON text carry ``contentSchema``, an annotation: validators
do not decode the text by themselves. docs/consumers.md shows their use from other languages.
"""

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
#: Where the wheel puts the files, inside this package.
PACKAGED_FOLDER = "schema_files"


def schema_folder() -> Traversable:
    """The folder holding the schema files: the installed package's copy, else the checkout's ``schemas/``."""
    packaged = files("core") / PACKAGED_FOLDER
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "schemas"


def load_schema(name: str) -> dict[str, Any]:
    """The schema called ``name`` (one of :data:`NAMES`), as a JSON object."""
    if name not in NAMES:
        raise KeyError(f"No schema is called {name!r}; the names are {', '.join(NAMES)}.")
    schema: dict[str, Any] = json.loads((schema_folder() / f"{name}{SUFFIX}").read_text(encoding="utf-8"))
    return schema


def load_all() -> dict[str, dict[str, Any]]:
    """Every schema, by name: what a validator must know to resolve the references between them."""
    return {name: load_schema(name) for name in NAMES}
