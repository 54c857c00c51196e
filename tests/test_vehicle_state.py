"""The latest state of each vehicle (issue 15): the merge rule, run by the real Lua script against
real Redis, and the whole pipeline with real worker processes and the emulator."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from signal import SIGTERM
from typing import Any

import httpx
import pydantic_core
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from rq import Worker
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from starlette.testclient import TestClient

from cli.operations import replay
from cli.redis_admin import load_functions
from cli.samples import SAMPLE_VEHICLE_ID, encode, sample_event
from core.redis.acl import acl_rules
from core.redis.keys import text, vehicle_state_key
from core.redis.published import OutputStream, StateChanged, state_ttl_to_set
from core.redis.vehicle_state import VehicleStates
from service.app import create_app
from tests.conftest import TOKEN, command_calls, signed_headers
from tests.contracts import check_vehicle_state, check_vehicle_state_report
from tests.examples import examples
from tests.pipeline import inject, outputs, run_worker_burst, worker_env
from tests.test_cli import run_cli

PREFIX = "smartcar:vehicle-state:"
SOC, ODOMETER, CHARGING = "tractionbattery-stateofcharge", "odometer-traveleddistance", "charge-ischarging"


# --- an independent model of the rule -------------------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    """What merging one event did: whether the state changed, and the codes it held newer."""

    changed: bool
    stale_signals: list[str]


def when(signal: dict[str, Any]) -> tuple[bool, int, bool, int]:
    """The time order: oemUpdatedAt, then retrievedAt; a missing time is older than any time."""
    oem, retrieved = signal.get("oemUpdatedAt"), signal.get("retrievedAt")
    return (oem is not None, oem or 0, retrieved is not None, retrieved or 0)


def rank(signal: dict[str, Any]) -> tuple[tuple[bool, int, bool, int], bytes]:
    """The total order: time, then the stored JSON's bytes (so no arrival order can matter). The
    state stores a signal with its two times first (the merge reads them there)."""
    return when(signal), pydantic_core.to_json({"oemUpdatedAt": None, "retrievedAt": None, **signal})


class Model:
    """What the state should hold, and what each merge should answer, computed in Python."""

    def __init__(self) -> None:
        self.signals: dict[str, dict[str, Any]] = {}

    def merge(self, signals: list[dict[str, Any]]) -> MergeResult:
        best: dict[str, dict[str, Any]] = {}
        for signal in signals:
            held = best.get(signal["code"])
            if held is None or rank(signal) > rank(held):
                best[signal["code"]] = signal
        changed, stale = False, set()
        for code, signal in best.items():
            held = self.signals.get(code)
            if held is None or rank(signal) > rank(held):
                self.signals[code] = signal
                changed = True
            elif when(signal) < when(held):
                stale.add(code)
        return MergeResult(changed, sorted(stale))


def newest_of(signals: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per code, the greatest version: the state any order of merges must end in."""
    newest: dict[str, dict[str, Any]] = {}
    for signal in signals:
        if signal["code"] not in newest or rank(signal) > rank(newest[signal["code"]]):
            newest[signal["code"]] = signal
    return newest


def state_signals(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {text(k): json.loads(v) for k, v in raw.items() if not text(k).startswith("_")}


# --- the merge rule against real Redis --------------------------------------------------------


class States:
    """One event at a time, merged as the worker does: planned, then applied with its publish."""

    def __init__(self, redis: AsyncRedis, ttl_seconds: int = 600) -> None:
        self.states = VehicleStates(redis, PREFIX)
        self.output = OutputStream(redis, "merges", 3600, state_ttl_seconds=ttl_seconds)

    async def merge(
        self, vehicle_id: str, event_id: str, signals: list[dict[str, Any]], vehicle=None, vehicle_from_api=True
    ) -> MergeResult:
        while True:
            plan = await self.states.plan(vehicle_id, signals, vehicle, vehicle_from_api)
            if not plan.writes:
                return MergeResult(changed=False, stale_signals=plan.stale_signals)
            try:
                assert await self.output.publish(event_id, {"event_id": event_id}, plan) is not None
            except StateChanged:
                continue
            return MergeResult(changed=True, stale_signals=plan.stale_signals)


# Times around the largest epoch ms the parser accepts too: one millisecond apart must still order.
TIMES = st.sampled_from(
    [None, 0, 1, 2, 3, 1_767_000_000_000, 1_767_000_000_001, 253_402_300_799_998, 253_402_300_799_999]
)
VERSION = st.fixed_dictionaries(
    {
        "code": st.sampled_from(["a", "b", "c"]),
        "name": st.just("N"),
        "group": st.sampled_from(["G", "H"]),
        "body": st.fixed_dictionaries({"value": st.integers(0, 2)}),
        "status": st.sampled_from(["SUCCESS", "ERROR"]),
        "oemUpdatedAt": TIMES,
        "retrievedAt": TIMES,
    }
)


def as_events(versions: list[dict[str, Any]], cuts: list[int]) -> list[list[dict[str, Any]]]:
    """``versions`` split into consecutive events at the positions ``cuts``."""
    bounds = [0, *sorted(set(cuts)), len(versions)]
    return [versions[a:b] for a, b in pairwise(bounds) if a < b]


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(versions=st.lists(VERSION, min_size=1, max_size=14), data=st.data())
def test_any_order_of_any_versions_ends_in_the_same_state(redis_url, versions, data):
    """Merged one by one in the drawn order, or shuffled and grouped into events of several signals
    (a code may come twice in one event), the state ends at the greatest version of each code; every
    merge answers (changed, staleSignals) as the model does; merging it all again changes nothing."""
    shuffled = data.draw(st.permutations(versions))
    cuts = data.draw(st.lists(st.integers(1, max(1, len(versions) - 1)), max_size=4))
    orders = [[[v] for v in versions], as_events(shuffled, cuts)]

    async def run() -> list[dict[str, Any]]:
        redis = AsyncRedis.from_url(redis_url)
        states = States(redis)
        finals = []
        try:
            for events in orders:
                vehicle_id, model = uuid.uuid4().hex, Model()
                for n, event in enumerate(events):
                    assert await states.merge(vehicle_id, f"e{n}-{vehicle_id}", event) == model.merge(event)
                for n, event in enumerate(events):
                    again = await states.merge(vehicle_id, f"again{n}-{vehicle_id}", event)
                    assert again == model.merge(event)
                    assert not again.changed
                raw = await redis.hgetall(vehicle_state_key(PREFIX, vehicle_id))
                assert state_signals(raw) == model.signals
                assert text(raw[b"_eventId"]).startswith("e")
                await redis.delete(vehicle_state_key(PREFIX, vehicle_id))
                finals.append(model.signals)
        finally:
            await redis.aclose()
        return finals

    first, second = asyncio.run(run())
    assert first == second == newest_of(versions)


def reading(code: str, oem: int | None, retrieved: int | None, value: object) -> dict[str, Any]:
    return {
        "code": code,
        "name": "N",
        "group": "G",
        "body": {"value": value},
        "status": "SUCCESS",
        "oemUpdatedAt": oem,
        "retrievedAt": retrieved,
    }


def merge_now(redis_url: str, *calls: tuple[Any, ...], ttl: int = 600) -> list[MergeResult]:
    """Run ``States.merge(*call)`` for each call, in order, on one client."""

    async def run() -> list[MergeResult]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            states = States(redis, ttl)
            return [await states.merge(*call) for call in calls]
        finally:
            await redis.aclose()

    return asyncio.run(run())


def test_a_signal_without_times_never_replaces_one_with_them(redis_url, redis_client):
    """An ERROR with no times, or a value with only retrievedAt, loses to a value with oemUpdatedAt;
    a value with no times fills a code the state does not have yet."""
    dated = reading("a", 1000, None, 1)
    undated = {"code": "a", "status": "ERROR", "error": {"type": "VEHICLE_STATE", "code": "UNREACHABLE"}}
    merge_now(
        redis_url,
        ("v1", "e1", [dated]),
        ("v1", "e2", [undated, reading("a", None, 99_999, 2), {"code": "b", "status": "ERROR"}]),
    )
    state = state_signals(redis_client.hgetall(vehicle_state_key(PREFIX, "v1")))
    assert state == {"a": dated, "b": {"code": "b", "status": "ERROR"}}


def test_times_are_read_off_the_front_and_older_layouts_are_still_compared_by_them(redis_url, redis_client):
    """Stored versions start with their times (the merge reads them without parsing, issue 27); a
    version stored in another key order (an earlier release) is still compared by its times."""
    key = vehicle_state_key(PREFIX, "v-layout")
    older_layout = reading("b", 5000, 5000, "stored by an earlier release")
    redis_client.hset(key, "b", json.dumps(older_layout, separators=(",", ":")))  # code first
    results = merge_now(
        redis_url,
        ("v-layout", "e1", [reading("a", 1000, 1010, 1), reading("b", 4000, 4000, "older")]),
        ("v-layout", "e2", [reading("a", 900, 2000, 0), reading("b", 6000, 6000, "newer")]),
    )
    assert [r.stale_signals for r in results] == [["b"], ["a"]]
    raw = {text(k): text(v) for k, v in redis_client.hgetall(key).items()}
    for code in ("a", "b"):
        assert raw[code].startswith('{"oemUpdatedAt":'), raw[code]
    state = state_signals(redis_client.hgetall(key))
    assert state == {"a": reading("a", 1000, 1010, 1), "b": reading("b", 6000, 6000, "newer")}


def test_the_vehicle_and_the_ttl(redis_url, redis_client):
    """`_vehicle` is filled by any copy and replaced only by one read from the API; the TTL is set and
    renewed only by a change; codes starting with `_` are never stored."""
    key = vehicle_state_key(PREFIX, "v2")
    webhook_copy, api_copy = {"id": "v2", "make": "FORD"}, {"id": "v2", "make": "TESLA", "year": 2022}
    results = merge_now(
        redis_url,
        ("v2", "e1", [reading("a", 1, 1, 1)], webhook_copy, False),
        ("v2", "e2", [reading("a", 1, 1, 1), reading("_vehicle", 9, 9, "x")], api_copy, True),
        ("v2", "e3", [reading("a", 2, 2, 2)], webhook_copy, False),
        ttl=500,
    )
    assert [r.changed for r in results] == [True, True, True]
    raw = {text(k): text(v) for k, v in redis_client.hgetall(key).items()}
    assert json.loads(raw["_vehicle"]) == api_copy
    assert raw["_eventId"] == "e3"
    assert set(raw) == {"_vehicle", "_updatedAt", "_eventId", "a"}
    assert 500 <= redis_client.ttl(key) <= state_ttl_to_set(500)
    redis_client.expire(key, 50)
    [unchanged] = merge_now(redis_url, ("v2", "e4", [reading("a", 1, 1, 1)], api_copy, True), ttl=500)
    assert unchanged == MergeResult(changed=False, stale_signals=["a"])
    assert redis_client.ttl(key) <= 50
    assert text(redis_client.hget(key, "_eventId")) == "e3"
    merge_now(redis_url, ("v2", "e5", [reading("a", 3, 3, 3)]), ttl=500)
    assert redis_client.ttl(key) > 50


def test_a_merge_renews_the_ttl_only_when_it_is_below_the_state_ttl(redis_url, redis_client):
    """A state lives at least the state TTL after its last change, and no merge writes an EXPIRE
    while the TTL set by an earlier one is still above the state TTL and a margin (for the time
    between the check and EXEC)."""
    key, ttl = vehicle_state_key(PREFIX, "v-ttl"), 1000
    redis_client.delete(key)

    def merge(n: int) -> int:
        before = command_calls(redis_client, "expire")
        assert merge_now(redis_url, ("v-ttl", f"e{n}", [reading("a", n, n, n)]), ttl=ttl)[0].changed
        assert redis_client.pttl(key) >= ttl * 1000  # at least the state TTL after this change
        return command_calls(redis_client, "expire") - before

    assert merge(1) == 1  # a new state gets its TTL
    assert redis_client.ttl(key) > ttl
    assert [merge(n) for n in (2, 3, 4)] == [0, 0, 0]  # still above the state TTL: left alone
    redis_client.expire(key, 5 * ttl)  # a longer TTL is never shortened
    assert merge(5) == 0
    assert redis_client.ttl(key) > 4 * ttl
    redis_client.expire(key, ttl - 2)  # below it: the next merge renews
    assert merge(6) == 1
    assert ttl < redis_client.ttl(key) <= state_ttl_to_set(ttl)
    redis_client.expire(key, ttl + 2)  # above it, within the margin: renewed too
    assert merge(7) == 1
    assert redis_client.ttl(key) > ttl + 2
    redis_client.persist(key)  # a state without a TTL (not written by the service) gets one
    assert merge(8) == 1
    assert redis_client.ttl(key) > ttl


def test_a_state_holding_what_the_service_never_writes_is_merged_over(redis_url, redis_client):
    """Redis's contents are input too: signals that are not JSON, times that are not numbers, an
    ``_updatedAt`` that is not a time, a time of 5,000 digits (past what Python turns into an int).
    The merge still answers, writes the event's versions over
    what it cannot read (a version without readable times is older than any time), and the next
    merge sees its own writes."""
    key = vehicle_state_key(PREFIX, "v-garbage")
    redis_client.hset(
        key,
        mapping={
            "a": "not json",
            "b": '{"oemUpdatedAt":"soon","retrievedAt":[1]}',
            "c": "[1,2]",
            "d": '{"oemUpdatedAt":' + "9" * 5000 + ',"retrievedAt":1,"code":"d"}',
            "_updatedAt": "yesterday",
            "_eventId": "x:y",
        },
    )
    event = [reading("a", 5, 5, 1), reading("b", 5, 5, 2), reading("c", 5, 5, 3), reading("d", 5, 5, 4)]
    first, again = merge_now(redis_url, ("v-garbage", "e1", event), ("v-garbage", "e2", event))
    assert first == MergeResult(changed=True, stale_signals=[])
    assert again == MergeResult(changed=False, stale_signals=[])
    raw = redis_client.hgetall(key)
    values = {code: signal["body"]["value"] for code, signal in state_signals(raw).items()}
    assert values == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert text(raw[b"_updatedAt"]).isdigit()
    assert text(raw[b"_eventId"]) == "e1"


# --- the merge applied with the publish, only on the state it was planned on ---------------------


def test_a_merge_planned_on_a_state_that_changed_is_refused_whole(redis_url, redis_client):
    """Another worker merges between this event's plan and its publish: nothing of this event is
    written, published or marked, and the other's merge stands."""

    async def scenario() -> tuple[bool, list[str]]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            states = VehicleStates(redis, PREFIX)
            output = OutputStream(redis, "out", 3600, state_ttl_seconds=600)
            mine = await states.plan("v9", [reading("a", 5, 5, "mine")])
            await States(redis).merge("v9", "theirs", [reading("a", 1, 1, "theirs")])
            with pytest.raises(StateChanged):
                await output.publish("mine", {"event_id": "mine"}, mine)
            again = await states.plan("v9", [reading("a", 5, 5, "mine")])
            entry = await output.publish("mine", {"event_id": "mine"}, again)
            return await output.was_published("mine"), [entry, again.writes[0]]
        finally:
            await redis.aclose()

    redis_client.delete("out")
    published, (entry, written) = asyncio.run(scenario())
    assert published
    assert entry is not None
    assert written == "a"
    assert redis_client.xlen("out") == 1
    assert json.loads(redis_client.hget(vehicle_state_key(PREFIX, "v9"), "a"))["body"] == {"value": "mine"}


class Interrupted(OutputStream):
    """An output stream whose first publish lets ``meanwhile`` run between its check and its write."""

    def __init__(self, redis: AsyncRedis, stream: str, meanwhile: Callable[[], Any]) -> None:
        super().__init__(redis, stream, 3600, state_ttl_seconds=600)
        self.meanwhile: Callable[[], Any] | None = meanwhile
        self.checks = 0

    async def _check(self, transaction: Any, args: list[Any]) -> Any:
        verdicts = await super()._check(transaction, args)
        self.checks += 1
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        return verdicts


@pytest.mark.parametrize("merge", ["none", "nothing to write", "writes"])
def test_a_second_publisher_of_the_event_between_the_check_and_the_write_leaves_one_entry(
    redis_url, redis_client, merge
):
    """Two workers publish one event (a re-run job): the second checks and publishes while the first
    is between its check and its write. The first's transaction aborts, it checks again and finds the
    event published; one entry, one merge, whatever the event merges (the guard, not the state, aborts
    it when it writes nothing)."""
    vehicle = f"v-twice-{merge.replace(' ', '-')}"

    async def scenario() -> tuple[str | None, str | None, int]:
        first_client, second_client = AsyncRedis.from_url(redis_url), AsyncRedis.from_url(redis_url)
        try:
            states = VehicleStates(first_client, PREFIX)
            signals = [reading("a", 5, 5, "same")]
            if merge == "nothing to write":  # the state holds the event's signal already
                await States(first_client).merge(vehicle, "earlier", signals)
            plan = None if merge == "none" else await states.plan(vehicle, signals)
            assert plan is None or bool(plan.writes) == (merge == "writes")
            second = OutputStream(second_client, "twice", 3600, state_ttl_seconds=600)
            entries: list[str | None] = []

            async def meanwhile() -> None:
                entries.append(await second.publish("ev-twice", {"event_id": "ev-twice"}, plan))

            first = Interrupted(first_client, "twice", meanwhile)
            mine = await first.publish("ev-twice", {"event_id": "ev-twice"}, plan)
            return mine, entries[0], first.checks
        finally:
            await first_client.aclose()
            await second_client.aclose()

    redis_client.delete("twice", vehicle_state_key(PREFIX, vehicle))
    mine, theirs, checks = asyncio.run(scenario())
    assert mine is None  # found published
    assert theirs is not None
    assert checks == 2  # its transaction aborted once
    assert [text(entry[1][b"event_id"]) for entry in redis_client.xrange("twice")] == ["ev-twice"]
    if merge != "none":
        assert text(redis_client.hget(vehicle_state_key(PREFIX, vehicle), "_eventId")) == (
            "ev-twice" if merge == "writes" else "earlier"
        )


def test_a_connection_lost_between_the_check_and_the_write_is_an_outage_not_a_conflict(redis_url, redis_client):
    """The publish's connection is dropped after its check: the caller gets the connection error (its
    outage wait rides it out) rather than an immediate new attempt; the next publish writes the event once."""

    async def scenario() -> tuple[BaseException | None, str | None]:
        redis = AsyncRedis.from_url(redis_url)
        try:

            async def meanwhile() -> None:
                redis_client.client_kill_filter(_type="normal", skipme=True)

            output = Interrupted(redis, "dropped", meanwhile)
            try:
                await output.publish("ev-dropped", {"event_id": "ev-dropped"})
                raised = None
            except RedisConnectionError as exc:
                raised = exc
            return raised, await output.publish("ev-dropped", {"event_id": "ev-dropped"})
        finally:
            await redis.aclose()

    redis_client.delete("dropped")
    raised, entry = asyncio.run(scenario())
    assert isinstance(raised, RedisConnectionError)
    assert entry is not None
    assert redis_client.xlen("dropped") == 1


def test_a_refused_entry_leaves_its_event_unmarked_and_its_merged_state_expiring(redis_url, redis_client):
    """The stream key holds a string: the transaction's XADD is refused and the error raised; the
    event is not marked (a re-run publishes it), and the merge that was applied keeps its TTL."""
    key = vehicle_state_key(PREFIX, "v-refused")

    async def scenario() -> bool:
        redis = AsyncRedis.from_url(redis_url)
        try:
            plan = await VehicleStates(redis, PREFIX).plan("v-refused", [reading("a", 5, 5, "x")])
            output = OutputStream(redis, "not-a-stream", 3600, state_ttl_seconds=600)
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await output.publish("ev-refused", {"event_id": "ev-refused"}, plan)
            return await output.was_published("ev-refused")
        finally:
            await redis.aclose()

    redis_client.delete(key)
    redis_client.set("not-a-stream", "a string")
    assert asyncio.run(scenario()) is False
    assert 600 <= redis_client.ttl(key) <= state_ttl_to_set(600)


def test_a_publish_inside_the_callers_outage_handling_still_retries_a_conflict(redis_url, redis_client):
    """A publish awaited while its caller handles a connection error: a conflict between its check
    and its write is retried (and finds the event published), not taken for that connection error."""

    async def scenario() -> tuple[str | None, str | None]:
        first_client, second_client = AsyncRedis.from_url(redis_url), AsyncRedis.from_url(redis_url)
        try:
            second = OutputStream(second_client, "outer", 3600)
            theirs: list[str | None] = []

            async def meanwhile() -> None:
                theirs.append(await second.publish("ev-outer", {"event_id": "ev-outer"}))

            first = Interrupted(first_client, "outer", meanwhile)
            try:
                raise RedisConnectionError("an earlier outage the caller is handling")
            except RedisConnectionError:
                mine = await first.publish("ev-outer", {"event_id": "ev-outer"})
            return mine, theirs[0]
        finally:
            await first_client.aclose()
            await second_client.aclose()

    redis_client.delete("outer")
    mine, theirs = asyncio.run(scenario())
    assert mine is None
    assert theirs is not None
    assert redis_client.xlen("outer") == 1


def test_another_events_merge_between_the_check_and_the_write_makes_it_plan_again(redis_url, redis_client):
    """Another event of the vehicle merges after this one's check: its transaction aborts, the check
    again finds the state changed, nothing of this event is written; planned again, it merges over the
    other's result."""
    key = vehicle_state_key(PREFIX, "v-between")

    async def scenario() -> list[str]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            states = VehicleStates(redis, PREFIX)
            plan = await states.plan("v-between", [reading("a", 5, 5, "mine")])

            async def meanwhile() -> None:
                await States(redis).merge("v-between", "theirs", [reading("b", 9, 9, "theirs")])

            output = Interrupted(redis, "between", meanwhile)
            with pytest.raises(StateChanged):
                await output.publish("mine", {"event_id": "mine"}, plan)
            assert output.checks == 2
            assert redis_client.xlen("between") == 0
            assert not await output.was_published("mine")
            again = await states.plan("v-between", [reading("a", 5, 5, "mine")])
            assert await output.publish("mine", {"event_id": "mine"}, again) is not None
            return sorted(code for code in again.writes[::2] if isinstance(code, str))
        finally:
            await redis.aclose()

    redis_client.delete("between", key)
    assert asyncio.run(scenario()) == ["a"]
    state = redis_client.hgetall(key)
    assert {code: signal["body"]["value"] for code, signal in state_signals(state).items()} == {
        "a": "mine",
        "b": "theirs",
    }
    assert text(state[b"_eventId"]) == "mine"
    assert redis_client.xlen("between") == 1


def test_concurrent_events_of_one_vehicle_in_one_call_each_merge_on_the_state_before_them(redis_url, redis_client):
    """Twenty events of one vehicle completing together (one completion call carries them): the
    first planned applies, the others are planned again on its result, until each is in; every
    entry's staleSignals name what the state held newer when it was merged, and the state ends at
    the newest version."""
    versions = list(range(20))
    random.Random(7).shuffle(versions)

    async def scenario() -> list[list[str]]:
        redis = AsyncRedis.from_url(redis_url)
        try:
            states = VehicleStates(redis, PREFIX)
            output = OutputStream(redis, "out2", 3600, state_ttl_seconds=600)

            async def complete(n: int) -> list[str]:
                event = f"c{n}"
                signals = [reading("a", n, n, n)]
                while True:
                    plan = await states.plan("v10", signals)
                    try:
                        assert await output.publish(event, {"event_id": event}, plan) is not None
                        return plan.stale_signals
                    except StateChanged:
                        continue

            return list(await asyncio.gather(*(complete(n) for n in versions)))
        finally:
            await redis.aclose()

    redis_client.delete("out2", vehicle_state_key(PREFIX, "v10"))
    stale = asyncio.run(scenario())
    assert redis_client.xlen("out2") == 20
    assert json.loads(redis_client.hget(vehicle_state_key(PREFIX, "v10"), "a"))["body"] == {"value": 19}
    assert any(s == ["a"] for s in stale)
    assert any(s == [] for s in stale)


# --- the pipeline: web, queue, real workers, emulator ---------------------------------------------


def deliver(settings, *events: dict[str, Any]) -> None:
    """Post each event, signed, to the web app; each must be accepted."""
    with TestClient(create_app(settings)) as client:
        for event in events:
            body = encode(event)
            response = client.post("/webhooks/smartcar", content=body, headers=signed_headers(body, TOKEN))
            assert response.status_code == 202, response.text


def vehicle_event(versions: dict[str, tuple[int, int, object]]) -> dict[str, Any]:
    """A sample delivery of the sample vehicle carrying ``code: (oemUpdatedAt, retrievedAt, value)``."""
    event = sample_event()
    event["data"]["signals"] = [
        {
            "code": code,
            "name": code.split("-")[1],
            "group": code.split("-")[0],
            "body": {"value": value},
            "meta": {"oemUpdatedAt": oem, "retrievedAt": retrieved},
            "status": {"value": "SUCCESS"},
        }
        for code, (oem, retrieved, value) in versions.items()
    ]
    return event


def state_of(redis_client, vehicle_id: str = SAMPLE_VEHICLE_ID) -> dict[str, str]:
    """The vehicle's state hash as the workers wrote it, checked against its published schema."""
    state = {text(k): text(v) for k, v in redis_client.hgetall(vehicle_state_key(PREFIX, vehicle_id)).items()}
    if state:
        check_vehicle_state(state)
    return state


def documents(redis_client) -> dict[str, dict[str, Any]]:
    return {entry["event_id"]: entry["document"] for entry in outputs(redis_client)}


def until(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    """Wait for ``condition`` (a readiness wait, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def run_on_two_worker_processes(pipeline, redis_client, events: list[dict[str, Any]]) -> list[int]:
    """Start two worker processes, deliver ``events`` once both wait on the queue, let them publish
    every one, stop them; returns how many jobs each ran."""
    env = worker_env(pipeline, METRICS_PORT="0")
    command = [sys.executable, "-m", "cli.main", "worker", "--concurrency", "8"]
    workers = [subprocess.Popen(command, env=env) for _ in range(2)]
    try:
        until(lambda: len(Worker.all(connection=redis_client)) == 2, "both workers to start")
        deliver(pipeline, *events)
        until(lambda: redis_client.xlen(pipeline.output_stream) >= len(events), "every event to be published")

        def job_counts() -> list[int]:
            return [w.successful_job_count for w in Worker.all(connection=redis_client)]

        # RQ records a job's success just after the job published: wait for the bookkeeping too.
        until(lambda: sum(job_counts()) >= len(events), "every job to be recorded")
        counts = job_counts()
        for worker in workers:
            worker.send_signal(SIGTERM)
        for worker in workers:
            assert worker.wait(timeout=60) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return counts


@pytest.mark.process
def test_shuffled_events_on_two_worker_processes_end_at_the_newest_values(pipeline, redis_client, emulator):
    """40 events of one vehicle, posted in shuffled order and worked in parallel by two worker
    processes: every signal ends at its newest version (ties on oemUpdatedAt broken by retrievedAt),
    the emulator's older /signals values never win, and the state is what the model merges from
    every published document, whatever the order the workers merged them in."""
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.02}).raise_for_status()
    base = 1_796_000_000_000
    events = [
        vehicle_event(
            {
                SOC: (base + i * 1000, base + i * 1000 + 10, 40 + i),
                ODOMETER: (base + (i // 4) * 1000, base + i * 7, 30_000 + i),  # four versions per oemUpdatedAt
                CHARGING: (base + (i % 10) * 1000, base + (i % 10) * 1000, i),  # the newest is sent four times
            }
        )
        for i in range(40)
    ]
    random.Random(15).shuffle(events)
    counts = run_on_two_worker_processes(pipeline, redis_client, events)
    assert sum(counts) == len(events)
    assert min(counts) > 0, f"one worker process ran every job: {counts}"

    published = documents(redis_client)
    assert sorted(published) == sorted(e["eventId"] for e in events)
    state = state_of(redis_client)
    signals = {code: json.loads(value) for code, value in state.items() if not code.startswith("_")}
    assert signals[SOC]["body"] == {"value": 79}
    assert signals[SOC]["oemUpdatedAt"] == base + 39_000
    assert signals[ODOMETER]["body"] == {"value": 30_039}
    assert (signals[ODOMETER]["oemUpdatedAt"], signals[ODOMETER]["retrievedAt"]) == (base + 9000, base + 39 * 7)
    assert signals[CHARGING]["oemUpdatedAt"] == base + 9000
    assert signals[CHARGING]["body"]["value"] in {9, 19, 29, 39}
    every = [s for document in published.values() for s in (*document["signals"], *document["latestSignals"])]
    assert signals == newest_of(every)
    assert state["_eventId"] in published
    assert json.loads(state["_vehicle"])["make"] == "TESLA"  # the API's vehicle, not the webhook's FORD
    # No event is told that the newest version it carried was stale.
    for document in published.values():
        for code in document["staleSignals"]:
            carried = newest_of([*document["signals"], *document["latestSignals"]])[code]
            assert when(carried) < when(signals[code]), (document["eventId"], code)


def test_an_old_event_redelivered_after_newer_ones_changes_nothing_and_is_stale(pipeline, redis_client):
    """A newer event, then an older one with a new eventId: the state is left exactly as it was and
    the older entry lists the signals it carried in staleSignals; the newer one lists none."""
    base = 1_796_000_000_000
    newer = vehicle_event({SOC: (base + 60_000, base + 61_000, 80), ODOMETER: (base + 60_000, base + 61_000, 30_100)})
    older = vehicle_event({SOC: (base, base + 1000, 70), ODOMETER: (base + 60_000, base + 2000, 30_000)})
    deliver(pipeline, newer)
    run_worker_burst(pipeline)
    before = state_of(redis_client)
    assert before["_eventId"] == newer["eventId"]
    deliver(pipeline, older)
    run_worker_burst(pipeline)
    assert state_of(redis_client) == before
    published = documents(redis_client)
    assert published[newer["eventId"]]["staleSignals"] == []
    assert published[older["eventId"]]["staleSignals"] == sorted([SOC, ODOMETER])


def test_a_replayed_older_event_changes_nothing(pipeline, redis_client, emulator):
    """An event parked (retries_exhausted) and replayed after a newer one was published: published
    with its signals in staleSignals, the state unchanged by it."""
    base = 1_796_000_000_000
    older = vehicle_event({SOC: (base, base + 10, 50)})
    newer = vehicle_event({SOC: (base + 5000, base + 5010, 55)})
    inject(emulator, path="/v3/vehicles/{id}/signals", status=503, rate=1.0)
    deliver(pipeline, older)
    run_worker_burst(pipeline)
    assert outputs(redis_client) == []
    assert not redis_client.exists(vehicle_state_key(PREFIX, SAMPLE_VEHICLE_ID))
    httpx.delete(f"{emulator}/_emulator/failures").raise_for_status()
    deliver(pipeline, newer)
    run_worker_burst(pipeline)
    before = state_of(redis_client)
    replay(pipeline, reason="retries_exhausted", limit=None)
    run_worker_burst(pipeline)
    assert state_of(redis_client) == before
    assert documents(redis_client)[older["eventId"]]["staleSignals"] == [SOC]


@contextmanager
def worker_that_cannot_publish(pipeline, redis_client) -> Iterator[Any]:
    """Settings of a worker whose Redis user may do everything a worker does but write the output
    stream: its jobs fail at the publish (a real refusal by Redis, nothing mocked)."""
    name = "worker-without-output"
    rules = [rule for rule in acl_rules(pipeline, "worker") if rule != f"~{pipeline.output_stream}"]
    assert len(rules) == len(acl_rules(pipeline, "worker")) - 1
    redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", ">crash-password", *rules)
    load_functions(pipeline.redis_url)  # as an admin: the role may only call them
    try:
        url = pipeline.redis_url.replace("redis://", f"redis://{name}:crash-password@", 1)
        yield pipeline.model_copy(update={"redis_url": url})
    finally:
        redis_client.acl_deluser(name)


def test_a_refused_publish_merges_nothing_and_the_rerun_does_both(pipeline, redis_client):
    """The merge and the publish are one step: jobs whose publish Redis refused left the state as
    it was; run again, each merges and publishes, its staleSignals naming what the state held newer
    when it was merged."""
    base = 1_796_000_000_000
    newer = vehicle_event({SOC: (base + 5000, base + 5010, 55), CHARGING: (base, base, True)})
    older = vehicle_event({SOC: (base, base + 10, 50), CHARGING: (base + 9000, base + 9000, False)})
    failed = FailedJobRegistry(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    with worker_that_cannot_publish(pipeline, redis_client) as crashing:
        deliver(pipeline, newer)
        run_worker_burst(crashing)
        deliver(pipeline, older)
        run_worker_burst(crashing)
    assert outputs(redis_client) == []
    assert sorted(failed.get_job_ids()) == sorted([newer["eventId"], older["eventId"]])
    assert state_of(redis_client) == {}

    failed.requeue(newer["eventId"])
    run_worker_burst(pipeline)
    failed.requeue(older["eventId"])
    run_worker_burst(pipeline)
    state = state_of(redis_client)
    assert state["_eventId"] == older["eventId"]  # its CHARGING is newer
    assert json.loads(state[SOC])["body"] == {"value": 55}
    assert json.loads(state[CHARGING])["body"] == {"value": False}
    published = documents(redis_client)
    assert published[newer["eventId"]]["staleSignals"] == []
    assert published[older["eventId"]]["staleSignals"] == [SOC]
    assert len(outputs(redis_client)) == 2


@pytest.mark.process
def test_vehicle_state_command(pipeline, redis_client, tmp_path):
    """`vehicle-state ID` prints the signals grouped with their ages; `--json` the same data; an
    unknown vehicle is one line and exit 1; an id that cannot be a vehicle id exit 2."""
    deliver(pipeline, sample_event())
    run_worker_burst(pipeline)
    env = {"REDIS_URL": pipeline.redis_url}
    result = run_cli("vehicle-state", SAMPLE_VEHICLE_ID, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"vehicle {SAMPLE_VEHICLE_ID}  TESLA Model Y 2022" in out
    for group, code in [("TractionBattery", SOC), ("Odometer", ODOMETER), ("Location", "location-preciselocation")]:
        assert f"\n{group}\n" in out
        assert code in out.split(f"\n{group}\n", 1)[1].split("\n\n", 1)[0]
    assert "81 percent" in out
    assert " ago / " in out

    as_json = run_cli("vehicle-state", SAMPLE_VEHICLE_ID, "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    check_vehicle_state_report(report)
    state = state_of(redis_client)
    assert report["eventId"] == state["_eventId"]
    assert 0 < report["expiresInSeconds"] <= state_ttl_to_set(pipeline.vehicle_state_ttl_seconds)
    for code, value in state.items():
        if not code.startswith("_"):
            shown = report["signals"][code]
            assert {k: v for k, v in shown.items() if not k.endswith("AgeSeconds")} == json.loads(value)
            if shown["oemUpdatedAt"]:
                assert shown["oemAgeSeconds"] > 0
            else:  # the VIN: OEMs date it 0, which is no age
                assert shown["oemAgeSeconds"] is None

    missing = run_cli("vehicle-state", "no-such-vehicle", env=env, cwd=tmp_path)
    assert missing.returncode == 1
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "no state for vehicle no-such-vehicle" in missing.stderr
    assert run_cli("vehicle-state", "not/a/vehicle", env=env, cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("prefix", ["fleet-a:state:"])
def test_the_prefix_setting_names_the_keys(pipeline, redis_client, prefix):
    """VEHICLE_STATE_PREFIX moves the hashes; nothing is written under the default one."""
    settings_ = pipeline.model_copy(update={"vehicle_state_prefix": prefix})
    deliver(settings_, sample_event())
    run_worker_burst(settings_)
    assert redis_client.exists(vehicle_state_key(prefix, SAMPLE_VEHICLE_ID))
    assert not redis_client.exists(vehicle_state_key(PREFIX, SAMPLE_VEHICLE_ID))
