"""examples/consumer.py against a real Redis: consumer group, ack, reclaim, idempotency, ordering."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.samples import SAMPLE_VEHICLE_ID, sample_event
from tests.pipeline import run_worker_burst
from tests.test_pipeline import deliver

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "consumer.py"
STREAM = "smartcar:vehicle-events"


def _load_example():
    spec = importlib.util.spec_from_file_location("example_consumer", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def publish(client, event_id, signals, vehicle_id="veh-1"):
    """An output entry in the contract's shape (schema v1), as the worker writes it."""
    document = {
        "schemaVersion": 1,
        "eventId": event_id,
        "eventType": "VEHICLE_STATE",
        "vehicle": {"id": vehicle_id},
        "signals": [
            {"code": code, "body": {"value": value}, "status": "SUCCESS", "oemUpdatedAt": at, "retrievedAt": at}
            for code, value, at in signals
        ],
        "latestSignals": [],
    }
    fields = {
        "event_id": event_id,
        "event_type": "VEHICLE_STATE",
        "user_id": "1",
        "vehicle_id": vehicle_id,
        "payload": json.dumps(document),
    }
    return client.xadd(STREAM, fields)


def latest(client, vehicle_id="veh-1"):
    stored = client.hgetall(f"example:latest:{vehicle_id}")
    bodies = {k.decode(): json.loads(v)["body"] for k, v in stored.items() if not k.endswith(b":oemUpdatedAt")}
    return {code: body.get("value", body) for code, body in bodies.items()}


def consumer(client, name="c1", **kwargs):
    return example.Consumer(client, "latest", name, example.LatestSignals(client), **kwargs)


def pending(client, group="latest"):
    return client.xpending(STREAM, group)["pending"]


def test_group_is_created_once_and_reads_only_new_entries(redis_client):
    """ensure_group creates the stream and group ($: only entries added later) and tolerates an existing group."""
    publish(redis_client, "before", [("odometer", 1, 1000)])
    reader = consumer(redis_client)
    reader.ensure_group()
    reader.ensure_group()
    publish(redis_client, "after", [("odometer", 2, 2000)])
    assert reader.read_new() == 1
    assert latest(redis_client) == {"odometer": 2}
    assert pending(redis_client) == 0
    [group] = redis_client.xinfo_groups(STREAM)
    assert group["lag"] == 0


def test_newer_oem_timestamp_wins_whatever_the_stream_order(redis_client):
    """A signal is kept only when its oemUpdatedAt is newer: an older state arriving later changes nothing."""
    reader = consumer(redis_client)
    reader.ensure_group()
    publish(redis_client, "new", [("soc", 80, 2000), ("odometer", 10, 2000)])
    publish(redis_client, "old", [("soc", 75, 1000), ("range", 300, 1000)])
    assert reader.read_new() == 2
    assert latest(redis_client) == {"soc": 80, "odometer": 10, "range": 300}


def test_an_entry_handled_twice_applies_once(redis_client):
    """Handling the same event_id again (a crash between effect and XACK) returns -1 and changes nothing."""
    apply = example.LatestSignals(redis_client)
    entry_id = publish(redis_client, "e-1", [("soc", 50, 1000)])
    [(_, raw)] = redis_client.xrange(STREAM, entry_id, entry_id)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    assert apply(fields) == 1
    redis_client.hset("example:latest:veh-1", mapping={"soc": json.dumps({"body": {"value": 99}})})
    assert apply(fields) == -1
    assert latest(redis_client) == {"soc": 99}


def test_a_crashed_consumers_pending_entry_is_reclaimed_and_acked(redis_client):
    """An entry read by a consumer that died before XACK is taken over by another with XAUTOCLAIM."""
    crashed = consumer(redis_client, "crashed")
    crashed.ensure_group()
    publish(redis_client, "e-1", [("soc", 60, 1000)])
    redis_client.xreadgroup("latest", "crashed", {STREAM: ">"})  # read, never acknowledged
    assert pending(redis_client) == 1
    survivor = consumer(redis_client, "survivor", min_idle_ms=0)
    assert survivor.reclaim() == 1
    assert pending(redis_client) == 0
    assert latest(redis_client) == {"soc": 60}


def test_a_restarted_consumer_finishes_its_own_pending_entries(redis_client):
    """On start, run() first handles what this consumer read before it stopped."""
    reader = consumer(redis_client, min_idle_ms=3_600_000)
    reader.ensure_group()
    publish(redis_client, "e-1", [("soc", 61, 1000)])
    redis_client.xreadgroup("latest", "c1", {STREAM: ">"})
    reader.run(burst=True)
    assert pending(redis_client) == 0
    assert latest(redis_client) == {"soc": 61}


def test_an_entry_that_keeps_failing_is_dead_lettered(redis_client):
    """A failing entry stays pending, and once delivered more than max_deliveries times it is moved aside."""

    def broken(fields):
        raise RuntimeError("downstream is broken")

    reader = example.Consumer(redis_client, "latest", "c1", broken, min_idle_ms=0, max_deliveries=2)
    reader.ensure_group()
    entry_id = publish(redis_client, "poison", [("soc", 1, 1)])
    assert reader.read_new() == 0
    assert pending(redis_client) == 1
    assert reader.reclaim() == 0  # second delivery: still failing, still pending
    assert pending(redis_client) == 1
    reader.reclaim()  # third delivery: over the limit
    assert pending(redis_client) == 0
    [(_, dead)] = redis_client.xrange(f"{STREAM}:dead:latest")
    assert dead[b"event_id"] == b"poison"
    assert dead[b"source_id"] == entry_id


@pytest.mark.process
def test_example_consumes_the_pipelines_output(pipeline, redis_client):
    """The example, run as a script, reads what the worker published and keeps the newest signals."""
    deliver(pipeline, sample_event(), sample_event())
    run_worker_burst(pipeline)
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--redis-url", pipeline.redis_url, "--from-start", "--burst"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [group] = redis_client.xinfo_groups(STREAM)
    assert (group["pending"], group["lag"], group["entries-read"]) == (0, 0, 2)
    stored = latest(redis_client, SAMPLE_VEHICLE_ID)
    assert {"tractionbattery-stateofcharge", "odometer-traveleddistance", "location-preciselocation"} <= stored.keys()
    assert len(redis_client.keys("example:processed:*")) == 2
