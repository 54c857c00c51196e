"""Checks what the service wrote against its published JSON Schemas (schemas/, via core.schemas).

The schemas are loaded as a consumer would load them (every file registered under its ``$id``,
nothing fetched from the network), and the JSON text inside stream fields and hash values is
decoded and checked against the schema its ``contentSchema`` names: validators treat that keyword
as an annotation only. Each ``check_*`` raises AssertionError naming every violation, and also
checks what a schema cannot say (the entry's fields repeat the payload's, a state field is named
after the code of the signal it holds).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from core.schemas import load_all

SCHEMAS = load_all()
REGISTRY: Registry[Any] = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012)) for schema in SCHEMAS.values()
)
FORMATS = FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    """RFC 3339 date-time (jsonschema checks it only with an optional package, not installed here)."""
    if not isinstance(value, str):
        return True
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    return "T" in value.upper() and parsed.tzinfo is not None


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A validator for the schema ``name`` that knows every other schema and checks formats."""
    return Draft202012Validator(SCHEMAS[name], registry=REGISTRY, format_checker=FORMATS)


def violations(name: str, instance: Any) -> list[str]:
    """Every way ``instance`` fails the schema ``name``, one line each (empty when it is valid)."""
    found = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found]


def check(name: str, instance: Any) -> None:
    problems = violations(name, instance)
    assert not problems, f"not a valid {name}:\n" + "\n".join(problems[:20])


def check_output_entry(fields: Mapping[str, str]) -> None:
    """An output stream entry and its payload."""
    _output_entry(tuple(sorted(fields.items())))


def check_parked_entry(fields: Mapping[str, str]) -> None:
    """A parked stream entry (its payload is the body as received, not checked further)."""
    _parked_entry(tuple(sorted(fields.items())))


def check_vehicle_state(fields: Mapping[str, str]) -> None:
    """A vehicle state hash as HGETALL answers it, with every JSON value decoded and checked."""
    check("vehicle-state", dict(fields))
    check("vehicle", json.loads(fields["_vehicle"]))
    for code, value in fields.items():
        if not code.startswith("_"):
            signal = json.loads(value)
            check("signal", signal)
            assert signal["code"] == code, f"the state field {code!r} holds a signal of code {signal['code']!r}"


def check_vehicle_state_report(report: Any) -> None:
    """What ``vehicle-state --json`` printed."""
    check("vehicle-state-report", report)
    for code, signal in report["signals"].items():
        assert signal["code"] == code, f"the report's {code!r} shows a signal of code {signal['code']!r}"


# Cached by content: tests poll streams, and an entry is checked once however often it is read.
@functools.lru_cache(maxsize=8192)
def _output_entry(items: tuple[tuple[str, str], ...]) -> None:
    fields = dict(items)
    check("output-entry", fields)
    payload = json.loads(fields["payload"])
    check("output-payload", payload)
    repeated = {
        "event_id": payload["eventId"],
        "event_type": payload["eventType"],
        "user_id": str(payload["user"]["id"]),
        "vehicle_id": payload["vehicle"]["id"],
    }
    assert {name: fields[name] for name in repeated} == repeated, "the entry's fields differ from its payload's"
    carried = {signal["code"] for signal in (*payload["signals"], *payload["latestSignals"])}
    stale = set(payload.get("staleSignals", ()))
    assert stale <= carried, f"staleSignals names codes the event does not carry: {sorted(stale - carried)}"


@functools.lru_cache(maxsize=8192)
def _parked_entry(items: tuple[tuple[str, str], ...]) -> None:
    check("parked-entry", dict(items))
