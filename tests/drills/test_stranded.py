"""Drills: jobs caught between leaving the queue and starting are put back and published exactly once.

Each drill forces its interleaving instead of hoping a timed kill lands in it: the worker runs as
:mod:`tests.drills.halting_worker`, which kills or freezes it at a named step, or the drill leaves
Redis in the state a dying worker would.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import redis
from rq import Queue
from rq.executions import Execution
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from cli.samples import sample_event
from core.redis.jobs import PROCESS_EVENT
from core.redis.keys import dequeued_key, rq_intermediate_key
from tests.drills.common import (
    frozen,
    kill_group,
    metrics_port_env,
    published_figures,
    published_ids,
    report,
    reruns,
    settle,
    start_worker,
    wait_until,
    whereabouts,
    worker_names,
)
from tests.pipeline import pipeline_settings
from tests.test_pipeline import deliver
from workers.reaper import reap, requeue, sweep_expired

QUEUE = "smartcar-events"
QUEUE_KEY = f"rq:queue:{QUEUE}"


def test_ids_left_in_rqs_intermediate_list_are_requeued_and_run_once(pipeline, redis_client):
    """Ids a stock RQ worker left in RQ's intermediate list (hashes still `queued`) are run, none failed."""
    events = [sample_event() for _ in range(10)]
    deliver(pipeline, *events)
    # What a stock RQ worker (or an older version of this one) killed right after its dequeue
    # leaves: ids moved into RQ's shared list, in no registry, their hashes saying `queued`.
    for _ in range(4):
        redis_client.lmove(QUEUE_KEY, rq_intermediate_key(QUEUE), "LEFT", "RIGHT")
    port, env = metrics_port_env()
    worker = start_worker(pipeline, "--concurrency", "8", **env)
    try:
        recovered = settle(redis_client, len(events))
        rerun = reruns(port)
    finally:
        kill_group(worker)
    published = published_ids(redis_client)
    expected = sorted(e["eventId"] for e in events)
    report(
        "stranded in RQ's intermediate list",
        acknowledged=len(events),
        stranded=4,
        **published_figures(published),
        reruns=rerun,
        recovered_seconds=round(recovered, 1),
    )
    assert sorted(published) == expected, whereabouts(redis_client, expected)
    assert FailedJobRegistry(QUEUE, connection=redis_client).count == 0
    assert redis_client.llen(rq_intermediate_key(QUEUE)) == 0


@pytest.mark.parametrize("point", ["dequeued", "prepared", "checked", "returned"])
def test_worker_killed_between_dequeue_and_start(pipeline, redis_client, emulator, point):
    """A worker SIGKILLed right after a dequeue (or after recording the execution), before the job starts,
    loses nothing: a peer puts its jobs back and each event is published once, no retry spent. So
    does one killed between a publish's check and its write, and one killed after a job published its
    event, before RQ recorded it: the re-run finds it out."""
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 1.0}).raise_for_status()
    events = [sample_event() for _ in range(12)]
    deliver(pipeline, *events)
    expected = sorted(e["eventId"] for e in events)
    victim = start_worker(pipeline, "--concurrency", "4", halt=f"{point}:3")
    survivor = None
    try:
        assert wait_until(lambda: victim.poll() is not None, 60), "the worker never halted"
        assert victim.returncode == -signal.SIGKILL, f"the worker ended by itself ({victim.returncode})"
        killed_at = time.monotonic()
        kill_group(victim)  # its scheduler process too
        (name,) = worker_names(redis_client)
        # The interleaving was hit: a batch taken off the queue and not started (in the worker's
        # list), or recorded as started by the worker (its executions) and not yet run.
        if point == "dequeued":
            assert redis_client.llen(dequeued_key(QUEUE, name)) >= 1
        else:
            recorded = {k.decode().split(":")[0] for k in redis_client.zrange(f"rq:wip:{QUEUE}", 0, -1)}
            started = {j for j in recorded if redis_client.hget(f"rq:job:{j}", "worker_name") == name.encode()}
            assert started, whereabouts(redis_client, expected)
            if point == "returned":  # published, and still recorded as started by the dead worker
                assert started & set(published_ids(redis_client)), whereabouts(redis_client, expected)
        httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.05}).raise_for_status()
        port, env = metrics_port_env()
        survivor = start_worker(pipeline, "--concurrency", "8", **env)
        settle(redis_client, len(events))
        recovered = time.monotonic() - killed_at
        rerun = reruns(port)
    finally:
        kill_group(victim)
        if survivor is not None:
            kill_group(survivor)
    published = published_ids(redis_client)
    report(
        f"worker SIGKILL after {point}",
        acknowledged=len(events),
        **published_figures(published),
        reruns=rerun,
        recovered_seconds=round(recovered, 1),
    )
    assert sorted(published) == expected, whereabouts(redis_client, expected)
    assert FailedJobRegistry(QUEUE, connection=redis_client).count == 0  # no retries to spend: none spent
    if point == "returned":
        assert rerun >= 1  # the published job ran again and found its event out


def test_a_worker_frozen_between_its_check_and_its_write_publishes_nothing_twice(pipeline, redis_client, emulator):
    """A worker frozen after a publish checked its events, before its transaction: a peer takes its jobs
    back and publishes them. Woken, the frozen worker's transaction aborts (the peer set the events'
    guards) and its check finds them published: each event once, none failed."""
    events = [sample_event() for _ in range(8)]
    deliver(pipeline, *events)
    expected = sorted(e["eventId"] for e in events)
    victim_port, victim_env = metrics_port_env()
    victim = start_worker(pipeline, "--concurrency", "4", halt="checked:1:stop", **victim_env)
    survivor = None
    try:
        assert wait_until(lambda: frozen(victim), 60), "the worker never froze"
        assert redis_client.xlen("smartcar:vehicle-events") == 0  # checked, nothing written
        frozen_at = time.monotonic()
        _port, env = metrics_port_env()
        survivor = start_worker(pipeline, "--concurrency", "8", **env)
        settle(redis_client, len(events))
        recovered = time.monotonic() - frozen_at
        os.kill(victim.pid, signal.SIGCONT)
        assert wait_until(lambda: reruns(victim_port) >= 1, 60), "the woken worker never found its event out"
        assert wait_until(lambda: redis_client.llen(QUEUE_KEY) == 0, 30)
        victim_reruns = reruns(victim_port)
        published = published_ids(redis_client)
        diagnosis = whereabouts(redis_client, expected)
    finally:
        kill_group(victim)
        if survivor is not None:
            kill_group(survivor)
    report(
        "worker frozen between a publish's check and its write",
        acknowledged=len(events),
        **published_figures(published),
        woken_reruns=victim_reruns,
        recovered_seconds=round(recovered, 1),
    )
    assert sorted(published) == expected, diagnosis
    assert FailedJobRegistry(QUEUE, connection=redis_client).count == 0


def test_redis_killed_between_dequeue_and_start(aof_redis, emulator, seeded_database):
    """Redis killed -9 while a worker holds a dequeued job it has not started, and while another move
    was applied whose answer the restart lost: the same worker, never restarted, runs both once."""
    settings = pipeline_settings(aof_redis.url, emulator, seeded_database)
    events = [sample_event() for _ in range(10)]
    deliver(settings, *events)
    expected = sorted(e["eventId"] for e in events)
    port, env = metrics_port_env()
    worker = start_worker(settings, "--concurrency", "4", halt="dequeued:2:stop", **env)
    client = redis.Redis.from_url(aof_redis.url)
    try:
        assert wait_until(lambda: frozen(worker), 60), "the worker never froze"
        (name,) = worker_names(client)
        # What Redis holds when it applied a dequeue and died before answering it.
        lost = client.lmove(QUEUE_KEY, dequeued_key(QUEUE, name), "LEFT", "RIGHT")
        assert lost is not None
        client.close()
        aof_redis.stop(kill=True)
        aof_redis.start()
        restarted_at = time.monotonic()
        os.kill(worker.pid, signal.SIGCONT)
        client = redis.Redis.from_url(aof_redis.url)
        settle(client, len(events))
        recovered = time.monotonic() - restarted_at
        alive = worker.poll() is None
        rerun = reruns(port)
        published = published_ids(client)
        diagnosis = whereabouts(client, expected)
    finally:
        kill_group(worker)
        client.close()
    report(
        "Redis SIGKILL between dequeue and start",
        acknowledged=len(events),
        **published_figures(published),
        reruns=rerun,
        recovered_seconds=round(recovered, 1),
        worker_alive=alive,
    )
    assert alive
    assert sorted(published) == expected, diagnosis


def test_sigterm_while_redis_is_down_stops_the_worker_and_loses_nothing(aof_redis, emulator, seeded_database):
    """SIGTERM during a Redis outage, with a dequeued job not yet started: the worker exits without waiting
    for Redis, and a worker started after Redis returns runs that job and every other once."""
    settings = pipeline_settings(aof_redis.url, emulator, seeded_database)
    events = [sample_event() for _ in range(5)]
    deliver(settings, *events)
    expected = sorted(e["eventId"] for e in events)
    worker = start_worker(settings, "--concurrency", "4", halt="dequeued:1:stop")
    successor = None
    try:
        assert wait_until(lambda: frozen(worker), 60), "the worker never froze"
        aof_redis.stop(kill=True)
        os.kill(worker.pid, signal.SIGCONT)
        worker.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert wait_until(lambda: worker.poll() is not None, 90), "SIGTERM did not stop the worker"
        stopped_in = time.monotonic() - stopping
        aof_redis.start()
        successor = start_worker(settings, "--concurrency", "4")
        client = redis.Redis.from_url(aof_redis.url)
        recovered = settle(client, len(events))
        published = published_ids(client)
        diagnosis = whereabouts(client, expected)
        client.close()
    finally:
        kill_group(worker)
        if successor is not None:
            kill_group(successor)
    report(
        "SIGTERM while Redis is down",
        acknowledged=len(events),
        **published_figures(published),
        stopped_seconds=round(stopped_in, 1),
        recovered_seconds=round(recovered, 1),
    )
    assert sorted(published) == expected, diagnosis


def test_requeueing_a_dead_workers_job_is_atomic_and_happens_once(redis_client):
    """Reapers racing over one dead worker put each job back once, at the queue's front; a job that
    finished only loses its stale execution; a job another worker runs now is left to it."""
    queue = Queue(QUEUE, connection=redis_client, serializer=JSONSerializer)
    waiting, running, finished, later = (queue.enqueue(PROCESS_EVENT, {"eventId": str(i)}) for i in range(4))
    for job in (waiting, running, finished):
        redis_client.lrem(QUEUE_KEY, 0, job.id)
    executions = {}
    with redis_client.pipeline() as pipe:
        for job in (waiting, running, finished):
            executions[job.id] = Execution.create(job, 180, pipeline=pipe, worker_name="gone")
        pipe.execute()
    redis_client.hset(running.key, mapping={"status": "started", "worker_name": "gone"})
    redis_client.hset(finished.key, "status", "finished")
    redis_client.rpush(dequeued_key(QUEUE, "gone"), later.id)
    redis_client.lrem(QUEUE_KEY, 0, later.id)

    first = reap(redis_client, QUEUE, {"gone"})
    second = reap(redis_client, QUEUE, {"gone"})

    assert sorted(first) == sorted([waiting.id, running.id, later.id])
    assert second == []
    front = [raw.decode() for raw in redis_client.lrange(QUEUE_KEY, 0, -1)]
    assert sorted(front) == sorted(first)  # the queue was empty: each once, nothing else
    assert len(front) == 3
    assert redis_client.zcard(f"rq:wip:{QUEUE}") == 0
    assert redis_client.hget(running.key, "status") == b"queued"
    assert redis_client.hget(finished.key, "status") == b"finished"
    # An execution of the dead worker whose job another worker has since started is not requeued.
    taken = queue.enqueue(PROCESS_EVENT, {"eventId": "taken"})
    redis_client.lrem(QUEUE_KEY, 0, taken.id)
    with redis_client.pipeline() as pipe:
        stale = Execution.create(taken, 180, pipeline=pipe, worker_name="gone")
        pipe.execute()
    redis_client.hset(taken.key, mapping={"status": "started", "worker_name": "alive-worker"})
    assert requeue(redis_client, QUEUE, [(taken.id, stale.id, "gone")], "a test") == []
    assert redis_client.lpos(QUEUE_KEY, taken.id) is None


def started_by(redis_client, worker: str, *jobs) -> list[Execution]:
    """Each job started by ``worker``: an execution registered for it and the job hash saying so."""
    with redis_client.pipeline() as pipe:
        executions = [Execution.create(job, 180, pipeline=pipe, worker_name=worker) for job in jobs]
        pipe.execute()
    for job in jobs:
        redis_client.hset(job.key, mapping={"status": "started", "worker_name": worker})
    return executions


def test_a_requeue_redis_refuses_strands_nothing(redis_client):
    """A job leaves the dead worker's list and the started registry only after it is back on the
    queue: a queue key that is not a list fails the reap with both still held, and the next reap
    puts both jobs back."""
    queue = Queue(QUEUE, connection=redis_client, serializer=JSONSerializer)
    dequeued, started = (queue.enqueue(PROCESS_EVENT, {"eventId": f"held-{i}"}) for i in range(2))
    redis_client.delete(QUEUE_KEY)
    redis_client.rpush(dequeued_key(QUEUE, "gone"), dequeued.id)
    [execution] = started_by(redis_client, "gone", started)
    redis_client.set(QUEUE_KEY, "spoiled")

    with pytest.raises(redis.ResponseError):
        reap(redis_client, QUEUE, {"gone"})
    assert redis_client.lrange(dequeued_key(QUEUE, "gone"), 0, -1) == [dequeued.id.encode()]
    with pytest.raises(redis.ResponseError):
        requeue(redis_client, QUEUE, [(started.id, execution.id, "gone")], "a test")
    assert redis_client.zcard(f"rq:wip:{QUEUE}") == 1
    assert redis_client.hget(started.key, "status") == b"started"

    redis_client.delete(QUEUE_KEY)
    assert sorted(reap(redis_client, QUEUE, {"gone"})) == sorted([dequeued.id, started.id])
    assert sorted(redis_client.lrange(QUEUE_KEY, 0, -1)) == sorted([dequeued.id.encode(), started.id.encode()])


def test_a_reap_drops_what_a_dead_worker_held_of_a_key_that_is_not_a_hash(redis_client):
    """An id (or an execution) whose job key holds a string is dropped from the dead worker's list
    (and the started registry) instead of failing the reap of everything it held."""
    queue = Queue(QUEUE, connection=redis_client, serializer=JSONSerializer)
    dequeued, started = (queue.enqueue(PROCESS_EVENT, {"eventId": f"beside-{i}"}) for i in range(2))
    spoiled = queue.enqueue(PROCESS_EVENT, {"eventId": "spoiled-later"})
    redis_client.delete(QUEUE_KEY)
    redis_client.rpush(dequeued_key(QUEUE, "gone"), "not-a-hash", dequeued.id)
    started_by(redis_client, "gone", started, spoiled)
    redis_client.set("rq:job:not-a-hash", "spoiled")
    redis_client.set(spoiled.key, "spoiled")

    assert sorted(reap(redis_client, QUEUE, {"gone"})) == sorted([dequeued.id, started.id])
    assert sorted(redis_client.lrange(QUEUE_KEY, 0, -1)) == sorted([dequeued.id.encode(), started.id.encode()])
    assert redis_client.llen(dequeued_key(QUEUE, "gone")) == 0
    assert redis_client.zcard(f"rq:wip:{QUEUE}") == 0


def test_an_expired_execution_of_a_key_that_is_not_a_hash_is_swept_with_the_rest(redis_client):
    """The sweep of expired executions read each job's hash, and one job key holding a string failed
    every pass: the genuine expired executions beside it were never requeued."""
    queue = Queue(QUEUE, connection=redis_client, serializer=JSONSerializer)
    genuine, spoiled = (queue.enqueue(PROCESS_EVENT, {"eventId": f"expired-{i}"}) for i in range(2))
    redis_client.delete(QUEUE_KEY)
    started_by(redis_client, "gone", spoiled, genuine)
    for composite in redis_client.zrange(f"rq:wip:{QUEUE}", 0, -1):  # both expired
        redis_client.zadd(f"rq:wip:{QUEUE}", {composite: time.time() - 10})
    redis_client.set(spoiled.key, "spoiled")

    assert sweep_expired(redis_client, QUEUE) == [genuine.id]
    assert redis_client.lrange(QUEUE_KEY, 0, -1) == [genuine.id.encode()]
    assert redis_client.zcard(f"rq:wip:{QUEUE}") == 0
