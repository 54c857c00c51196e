"""``smartcar-ingest vehicle-state VEHICLE_ID [--json]``: one vehicle's latest state, read from its
state hash (:mod:`core.redis.vehicle_state`), signal by signal with their ages; changes nothing
(docs/consumers.md, "The latest state of a vehicle")."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from typing import Any

from cli.operations import open_command_redis, redis_errors
from cli.status import duration
from core.config import Settings
from core.errors import ConfigurationError
from core.events.wire import VEHICLE_ID_PATTERN
from core.redis.vehicle_state import StoredState, read_state

#: The longest value the text form prints before cutting it with "…".
VALUE_WIDTH = 48
_NO_GROUP = "(no group)"


def state_report(state: StoredState, now_ms: int) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints): signals by code, each with its ages."""
    signals = {}
    for code in sorted(state.signals):
        signal = state.signals[code]
        signals[code] = signal | {
            "oemAgeSeconds": _age_seconds(signal.get("oemUpdatedAt"), now_ms),
            "retrievedAgeSeconds": _age_seconds(signal.get("retrievedAt"), now_ms),
        }
    return {
        "vehicleId": state.vehicle_id,
        "key": state.key,
        "generatedAt": _iso(now_ms),
        "vehicle": state.vehicle,
        "updatedAt": None if state.updated_at_ms is None else _iso(state.updated_at_ms),
        "updatedAgeSeconds": _age_seconds(state.updated_at_ms, now_ms),
        "eventId": state.event_id,
        "expiresInSeconds": state.ttl_seconds,
        "signals": signals,
    }


def render_text(report: dict[str, Any]) -> str:
    """The report as one screen of text, signals grouped."""
    vehicle = report["vehicle"] or {}
    title = " ".join(str(vehicle[k]) for k in ("make", "model", "year") if vehicle.get(k) is not None)
    lines = [f"vehicle {report['vehicleId']}" + (f"  {title}" if title else ""), f"  key      {report['key']}"]
    updated = "never" if report["updatedAt"] is None else f"{report['updatedAt']} ({_ago(report['updatedAgeSeconds'])})"
    lines.append(f"  updated  {updated} by event {report['eventId'] or '?'}")
    expires = report["expiresInSeconds"]
    lines.append("  expires  " + ("never (no TTL)" if expires is None else f"in {duration(expires)} unless it changes"))
    signals: dict[str, dict[str, Any]] = report["signals"]
    lines.append(f"  signals  {len(signals)}  (age: by the car's clock / by Smartcar's)")
    groups: dict[str, list[dict[str, Any]]] = {}
    for code, signal in signals.items():
        groups.setdefault(str(signal.get("group") or _NO_GROUP), []).append(signal | {"code": code})
    width = max((len(code) for code in signals), default=0)
    for group in sorted(groups):
        lines += ["", group]
        for signal in groups[group]:
            ages = f"{_ago(signal['oemAgeSeconds'])} / {_ago(signal['retrievedAgeSeconds'])}"
            lines.append(f"  {signal['code'].ljust(width)}  {_value(signal).ljust(VALUE_WIDTH)}  {ages}")
    return "\n".join(lines)


def vehicle_state(settings: Settings, vehicle_id: str, as_json: bool = False) -> int:
    """Print one vehicle's state; exit status 1 when it has none, 2 for an id that cannot be one."""
    if not re.fullmatch(VEHICLE_ID_PATTERN, vehicle_id):
        raise ConfigurationError("VEHICLE_ID is not a Smartcar vehicle id (1 to 64 of A-Z, a-z, 0-9, _ and -).")
    client = open_command_redis(settings)
    try:
        with redis_errors("read"):
            state = read_state(client, settings.vehicle_state_prefix, vehicle_id)
    finally:
        client.close()
    if state is None:
        print(
            f"smartcar-ingest vehicle-state: no state for vehicle {vehicle_id}: no event of it was published "
            "yet, or none in VEHICLE_STATE_TTL_SECONDS.",
            file=sys.stderr,
        )
        return 1
    report = state_report(state, time.time_ns() // 1_000_000)
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else render_text(report))
    return 0


def _value(signal: dict[str, Any]) -> str:
    """``81 percent``, ``True``, ``ERROR COMPATIBILITY/VEHICLE_NOT_CAPABLE`` or compact JSON, cut to fit."""
    if "unreadable" in signal:
        return "(unreadable)"
    status = signal.get("status")
    body = signal.get("body")
    if status not in (None, "SUCCESS") and not body:
        error = signal.get("error") or {}
        detail = "/".join(str(error[k]) for k in ("type", "code") if error.get(k))
        return f"{status} {detail}".strip()
    if isinstance(body, dict) and set(body) <= {"value", "unit"} and "value" in body:
        text = f"{body['value']} {body.get('unit') or ''}".strip()
    else:
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 1] + "…"


def _age_seconds(epoch_ms: object, now_ms: int) -> float | None:
    """Seconds since ``epoch_ms``; None when unknown or 0 (OEMs send 0 for values they never date,
    such as the VIN)."""
    if not isinstance(epoch_ms, int) or isinstance(epoch_ms, bool) or epoch_ms <= 0:
        return None
    return round((now_ms - epoch_ms) / 1000, 3)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 0:
        return f"in {duration(-seconds)}"
    return f"{duration(seconds)} ago"


def _iso(epoch_ms: int) -> str:
    moment = dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
