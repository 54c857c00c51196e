"""core.jsontext writes JSON with orjson, and stays byte for byte what pydantic-core gives.

The worker switched its hot-path JSON from pydantic-core to orjson for speed (docs/performance.md,
"JSON with orjson"); these tests fail if the two ever disagree on a captured delivery or on a value
an attacker could put in one, so that an orjson release that moves is noticed before it ships.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pydantic_core
import pytest

from bench.worker_cpu import _cases
from core.events.parse import parse_stored
from core.jsontext import dumps
from core.store.users import UserRecord
from workers.output import Enrichment, build_document


def nested(depth: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


CAPTURED = sorted((Path(__file__).parent / "fixtures" / "captured").glob("*.json"))

#: Values orjson refuses (past 64 bits, a lone surrogate, nesting past its limit) or writes its own way
#: unless told (NaN, infinities), with the ordinary ones beside them.
HOSTILE: dict[str, Any] = {
    "past 64 bits": {"n": 2**64, "m": -(2**63) - 1, "huge": 10**400},
    "at 64 bits": [2**64 - 1, -(2**63)],
    "nan and infinities": {"nan": math.nan, "inf": math.inf, "-inf": -math.inf},
    "floats": [-0.0, 1e16, 5e-324, 1.7976931348623157e308, 0.1, 1.5e-7, 123456789.125],
    "lone surrogate": {"name": "\ud800"},
    "non-BMP and controls": {"s": '😀 \x00\x1f\x7f </script> \u2028 "\\'},
    "deep": nested(60),
    "deeper than orjson goes": nested(300),
    "scalars": [True, False, None, 0, "", {}, []],
}


def pydantic_dumps(value: Any) -> bytes:
    return pydantic_core.to_json(value, inf_nan_mode="null")


@pytest.mark.parametrize("path", CAPTURED, ids=lambda p: p.name)
def test_a_captured_delivery_and_each_of_its_signals_are_the_same_bytes(path):
    document = pydantic_core.from_json(path.read_bytes())
    assert dumps(document) == pydantic_dumps(document)
    for signal in (document.get("data") or {}).get("signals") or ():
        assert dumps(signal) == pydantic_dumps(signal)


def outcome(write: Any, value: Any) -> bytes | type[BaseException]:
    try:
        return write(value)  # type: ignore[no-any-return]
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_value_is_written_or_refused_as_pydantic_core_does(name):
    """Past what orjson takes, the same bytes or the same error (a lone surrogate, nesting past 255)."""
    assert outcome(dumps, HOSTILE[name]) == outcome(pydantic_dumps, HOSTILE[name])


def test_orjson_reads_a_big_integer_as_a_float_which_is_why_reading_stays_with_pydantic_core():
    """If an orjson release reads it exactly, reading could move to orjson too (about a third faster)."""
    text = b'{"big": 123456789012345678901234567890}'
    assert type(orjson.loads(text)["big"]) is float
    assert pydantic_core.from_json(text)["big"] == 123456789012345678901234567890


def test_the_bytes_written_hold_no_more_memory_than_their_length():
    """orjson's answer keeps its whole write buffer; dumps hands back bytes of their own size (a merge
    holds every signal's JSON of 256 events in flight)."""
    signal = {"oemUpdatedAt": 1, "retrievedAt": 2, "code": "charge-voltage", "body": {"value": 230.5}}
    size = len(dumps(signal))
    tracemalloc.start()
    try:
        held = [dumps(signal) for _ in range(1000)]
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(held) == 1000
    assert traced / 1000 < size + 128


def test_the_output_entry_of_a_fleet_event_is_the_same_bytes():
    """The whole output document (webhook, user, the two answers, reads) of fleet-mix events."""
    for body, vehicle_answer, signals_answer in _cases(24):
        event = parse_stored(body)
        enrichment = Enrichment(
            vehicle=pydantic_core.from_json(vehicle_answer),
            signals=pydantic_core.from_json(signals_answer)["data"],
            reads={"vehicle": {"source": "fetched", "fetchedAt": 1767000000000, "reason": None}},
        )
        user = UserRecord(7, None, None, event.smartcar_user_id)
        document = build_document(event, user, enrichment, 1767000000000, 1767000000100)
        assert dumps(document) == pydantic_dumps(document)
