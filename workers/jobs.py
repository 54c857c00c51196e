"""RQ job functions. Each takes plain JSON data and is importable as ``workers.jobs.<name>``."""

from __future__ import annotations

from typing import Any


def process_event(payload: dict[str, Any]) -> dict[str, Any]:
    """Process one accepted delivery (filled in by the worker issue)."""
    return {"eventId": payload["eventId"], "status": "received"}
