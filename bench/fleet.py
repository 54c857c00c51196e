"""The emulator with a synthetic fleet, as a uvicorn factory for the worker benchmark."""

from __future__ import annotations

import os

from starlette.applications import Starlette

from emulator.app import EmulatorConfig, create_app
from emulator.seed import default_seed, seed_fleet


def app() -> Starlette:
    size = int(os.environ.get("BENCH_FLEET", "2000"))
    return create_app(EmulatorConfig(seed=default_seed() + seed_fleet(size)))
