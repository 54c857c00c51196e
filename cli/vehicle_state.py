"""``smartcar-ingest vehicle-state VEHICLE_ID [--json]``: one vehicle's latest state, read from its
state hash (:mod:`core.redis.vehicle_state`), signal by signal with their ages; changes nothing
(docs/consumers.md, "The latest state of a vehicle")."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from redis import Redis as SyncRedis

from cli.operations import open_command_redis, redis_errors
from cli.status import duration
from core.config import Settings
from core.errors import ConfigurationError, PermanentError
from core.events.wire import VEHICLE_ID_PATTERN
from core.redis.clients import command_redis
from core.redis.keys import text, vehicle_state_key
from core.redis.vehicle_state import EVENT_ID_FIELD, RESERVED_PREFIX, UPDATED_AT_FIELD, VEHICLE_FIELD, json_object
from workers.output import iso_ms

#: The longest value the text form prints before cutting it with "…".
VALUE_WIDTH = 48


def state_report(client: SyncRedis, prefix: str, vehicle_id: str, now_ms: int) -> dict[str, Any] | None:
    """The vehicle's state as plain data (what ``--json`` prints), signals by code with their ages;
    None when it has none (never seen, or expired). A stored value that is not a JSON object is
    reported as ``{"code": code, "unreadable": text}``."""
    key = vehicle_state_key(prefix, vehicle_id)
    with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(key)
        pipe.ttl(key)
        raw, ttl = pipe.execute()
    if not raw:
        return None
    fields = {text(name): text(value) for name, value in raw.items()}
    signals = {}
    for code in sorted(fields):
        if not code.startswith(RESERVED_PREFIX):
            parsed = json_object(fields[code])
            signal = parsed if parsed is not None else {"code": code, "unreadable": fields[code]}
            signals[code] = signal | {
                "oemAgeSeconds": _age_seconds(signal.get("oemUpdatedAt"), now_ms),
                "retrievedAgeSeconds": _age_seconds(signal.get("retrievedAt"), now_ms),
            }
    updated_at = fields.get(UPDATED_AT_FIELD, "")
    updated_ms = int(updated_at) if updated_at.isdigit() else None
    return {
        "vehicleId": vehicle_id,
        "key": key,
        "generatedAt": iso_ms(now_ms),
        "vehicle": json_object(fields.get(VEHICLE_FIELD, "")),
        "updatedAt": None if updated_ms is None else iso_ms(updated_ms),
        "updatedAgeSeconds": _age_seconds(updated_ms, now_ms),
        "eventId": fields.get(EVENT_ID_FIELD),
        "expiresInSeconds": int(ttl) if isinstance(ttl, int) and ttl >= 0 else None,
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
        groups.setdefault(str(signal.get("group") or "(no group)"), []).append(signal | {"code": code})
    width = max((len(code) for code in signals), default=0)
    for group in sorted(groups):
        lines += ["", group]
        for signal in groups[group]:
            ages = f"{_ago(signal['oemAgeSeconds'])} / {_ago(signal['retrievedAgeSeconds'])}"
            lines.append(f"  {signal['code'].ljust(width)}  {_value(signal).ljust(VALUE_WIDTH)}  {ages}")
    return "\n".join(lines)


def vehicle_state(settings: Settings, vehicle_id: str, as_json: bool) -> None:
    """Print one vehicle's state; exit status 1 when it has none, 2 for an id that cannot be one."""
    if not re.fullmatch(VEHICLE_ID_PATTERN, vehicle_id):
        raise ConfigurationError("VEHICLE_ID is not a Smartcar vehicle id (1 to 64 of A-Z, a-z, 0-9, _ and -).")
    with open_command_redis(command_redis, settings) as client, redis_errors("read"):
        report = state_report(client, settings.vehicle_state_prefix, vehicle_id, time.time_ns() // 1_000_000)
    if report is None:
        raise PermanentError(
            f"no state for vehicle {vehicle_id}: no event of it was published yet, or none in VEHICLE_STATE_TTL_SECONDS."
        )
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else render_text(report))


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
    """Seconds since ``epoch_ms``; None when unknown or 0 (OEMs date the VIN and the like 0)."""
    if not isinstance(epoch_ms, int) or isinstance(epoch_ms, bool) or epoch_ms <= 0:
        return None
    return round((now_ms - epoch_ms) / 1000, 3)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 0:
        return f"in {duration(-seconds)}"
    return f"{duration(seconds)} ago"
