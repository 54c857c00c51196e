"""Drills: a worker SIGKILLed mid-batch (every job it held is re-run and published exactly once); and no
process of a worker outlives it, after a SIGKILL or a SIGTERM of its own pid, with Redis up or down."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.scheduler import SCHEDULER_KEY_TEMPLATE

from cli.samples import sample_event
from core.config import Settings
from tests.drills.common import kill_group, report, start_worker, wait_until
from tests.pipeline import outputs, pipeline_settings
from tests.test_pipeline import deliver
from workers import housekeeping as scheduler_module
from workers.housekeeping import Housekeeping, PatientScheduler


def test_sigkilled_worker_jobs_are_rerun_and_published_once(pipeline, redis_client, emulator):
    """Kill -9 a worker holding 20 jobs; a second worker publishes all 20, each once, within seconds."""
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 3.0}).raise_for_status()
    events = [sample_event() for _ in range(20)]
    deliver(pipeline, *events)
    victim = start_worker(pipeline, "--concurrency", "20")
    survivor = None
    try:
        started = StartedJobRegistry(pipeline.ingest_queue, connection=redis_client)
        deadline = time.monotonic() + 30
        while started.count < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.count == 20
        kill_group(victim)
        killed_at = time.monotonic()
        httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 0.05}).raise_for_status()
        survivor = start_worker(pipeline, "--concurrency", "20")
        while len(outputs(redis_client)) < 20 and time.monotonic() < killed_at + 90:
            time.sleep(0.1)
        recovered_in = time.monotonic() - killed_at
    finally:
        kill_group(victim)
        if survivor is not None:
            kill_group(survivor)
    published = [e["event_id"] for e in outputs(redis_client)]
    report("worker SIGKILL", jobs=20, recovered_seconds=round(recovered_in, 1), published=len(published))
    assert sorted(published) == sorted(e["eventId"] for e in events)  # all, and each exactly once
    assert FailedJobRegistry(pipeline.ingest_queue, connection=redis_client).count == 0


# --- No process of a worker outlives it (issue 26, item 7) ---

#: The longest an idle worker may take to stop: its shutdown time is the chart's grace period less the
#: job timeout (``worker.terminationGraceMarginSeconds``, 30 s); with no job in flight it needs no more.
IDLE_SHUTDOWN_SECONDS = 30.0


def _stat(pid: int) -> tuple[str, int, str] | None:
    """State, parent pid and start time of ``pid`` from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root``, by pid, with its start time (which tells a reused pid apart)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
            started[int(entry.name)] = stat[2]
    found: dict[int, str] = {}
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop()
        found[pid] = started[pid]
        pending += children.get(pid, [])
    return found


def _living(processes: dict[int, str]) -> list[int]:
    """The pids of ``processes`` still running (a zombie has ended; its parent only has not reaped it)."""
    alive = []
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[0] not in {"Z", "X"}:
            alive.append(pid)
    return alive


def _scheduler_born(client: redis.Redis, pids: dict[int, str]) -> bool:
    """True once one of ``pids`` is RQ's scheduler and has registered itself (its signal handlers are in place)."""
    with contextlib.suppress(redis.RedisError):
        for key in client.scan_iter(SCHEDULER_KEY_TEMPLATE % "*"):
            pid = client.hget(key, "pid")
            if pid is not None and int(pid) in pids:
                return True
    return False


def _worker_with_its_scheduler(
    settings: Settings, client: redis.Redis
) -> tuple[subprocess.Popen[bytes], dict[int, str]]:
    """A worker, once RQ's scheduler runs in its child process; with that worker's descendants."""
    worker = start_worker(settings, "--concurrency", "4")
    family: dict[int, str] = {}

    def scheduler_running() -> bool:
        family.update(_descendants(worker.pid))
        return _scheduler_born(client, family)

    assert wait_until(scheduler_running, 60), "the worker never started RQ's scheduler"
    return worker, family


def _kill_all(worker: subprocess.Popen[bytes], family: dict[int, str]) -> None:
    """Clean up after a failed drill: the worker's group, and any descendant that left it."""
    kill_group(worker)
    for pid in _living(family):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _settle_with_redis(aof_redis, client, worker, family: set[int], redis_state: str) -> None:
    """With Redis ``down``, kill it and give the worker and its scheduler time to find it gone (they
    are then waiting for it); either way, note every process the worker has started by now."""
    if redis_state == "down":
        client.close()
        aof_redis.stop(kill=True)
        time.sleep(2.0)
    family.update(_descendants(worker.pid))


@pytest.mark.parametrize("redis_state", ["up", "down"])
def test_sigkilled_worker_leaves_no_process(aof_redis, emulator, seeded_database, redis_state):
    """kill -9 of the worker's own pid only (an OOM kill, a drain without cgroups): its scheduler child
    ends too, whether it is working (Redis up) or waiting for Redis (Redis down)."""
    settings = pipeline_settings(aof_redis.url, emulator, seeded_database)
    client = redis.Redis.from_url(aof_redis.url)
    worker, family = _worker_with_its_scheduler(settings, client)
    try:
        _settle_with_redis(aof_redis, client, worker, family, redis_state)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        killed_at = time.monotonic()
        gone = wait_until(lambda: not _living(family), 30)
        left = _living(family)
        report(
            f"worker SIGKILL, Redis {redis_state}",
            children=len(family),
            left=len(left),
            gone_seconds=round(time.monotonic() - killed_at, 1) if gone else None,
        )
        assert not left, f"processes of the SIGKILLed worker still running: {left}"
    finally:
        _kill_all(worker, family)
        client.close()


@pytest.mark.parametrize("redis_state", ["up", "down"])
def test_sigterm_ends_every_process_of_the_worker(aof_redis, emulator, seeded_database, redis_state):
    """SIGTERM to the worker's pid only (as a container runtime sends it): the worker and every process
    it started have ended within its shutdown time, Redis up or down."""
    settings = pipeline_settings(aof_redis.url, emulator, seeded_database)
    client = redis.Redis.from_url(aof_redis.url)
    worker, family = _worker_with_its_scheduler(settings, client)
    try:
        _settle_with_redis(aof_redis, client, worker, family, redis_state)
        worker.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        ended = wait_until(lambda: worker.poll() is not None and not _living(family), IDLE_SHUTDOWN_SECONDS)
        left = _living(family) + ([worker.pid] if worker.poll() is None else [])
        report(
            f"worker SIGTERM, Redis {redis_state}",
            processes=len(family) + 1,
            left=len(left),
            stopped_seconds=round(time.monotonic() - stopping, 1) if ended else None,
        )
        assert not left, f"processes of the worker still running {IDLE_SHUTDOWN_SECONDS:.0f} s after SIGTERM: {left}"
        assert worker.returncode == 0
    finally:
        _kill_all(worker, family)
        client.close()


def test_sigterm_to_the_scheduler_alone_leaves_the_worker_running(aof_redis, emulator, seeded_database):
    """A signal for the scheduler's process is not one for the worker (they shared the event loop's
    wakeup fd after the fork), and the worker starts a scheduler again at a maintenance pass."""
    settings = pipeline_settings(aof_redis.url, emulator, seeded_database)
    client = redis.Redis.from_url(aof_redis.url)
    worker, family = _worker_with_its_scheduler(settings, client)
    try:
        first = set(_living(family))
        for pid in first:
            os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not _living({pid: family[pid] for pid in first}), 30), "the scheduler ignored SIGTERM"

        def another_scheduler() -> bool:
            family.update(_descendants(worker.pid))
            return _scheduler_born(client, {pid: started for pid, started in family.items() if pid not in first})

        restarted = wait_until(another_scheduler, 90)
        assert worker.poll() is None, "the worker stopped with its scheduler"
        assert restarted, "the worker did not start its scheduler again"
    finally:
        _kill_all(worker, family)
        client.close()


def test_sigterm_to_the_workers_group_is_one_warm_shutdown(pipeline, redis_client, emulator):
    """SIGTERM (or Ctrl-C's SIGINT) to the worker's whole group reaches its scheduler too: that is not a
    second signal for the worker, so its jobs in flight finish and are published, not put back."""
    httpx.post(f"{emulator}/_emulator/latency", json={"seconds": 3.0}).raise_for_status()
    events = [sample_event() for _ in range(4)]
    deliver(pipeline, *events)
    worker, family = _worker_with_its_scheduler(pipeline, redis_client)
    try:
        started = StartedJobRegistry(pipeline.ingest_queue, connection=redis_client)
        assert wait_until(lambda: started.count == 4, 30)
        os.killpg(worker.pid, signal.SIGTERM)
        ended = wait_until(lambda: worker.poll() is not None and not _living(family), IDLE_SHUTDOWN_SECONDS)
        published = [e["event_id"] for e in outputs(redis_client)]
        report("worker group SIGTERM", in_flight=4, published=len(published), ended=ended)
        assert ended
        assert sorted(published) == sorted(e["eventId"] for e in events)
    finally:
        _kill_all(worker, family)


def test_a_scheduler_deaf_to_sigterm_is_killed_at_the_workers_stop(redis_client, monkeypatch):
    """The worker's stop waits for its scheduler a bounded time (a SIGTERM can land before the child's
    handlers are in place), then kills it: the stop never hangs on it."""
    monkeypatch.setattr(scheduler_module, "STOP_SECONDS", 0.5)
    scheduler = _Deaf(["smartcar-events"], connection=redis_client)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the forked child inherits it
    try:
        process = scheduler.start()
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        scheduler.stop_process()
        assert not process.is_alive()
        assert process.exitcode == -signal.SIGKILL
    finally:
        if process.is_alive():
            process.kill()
            process.join()


def test_a_stuck_scheduler_lets_its_lock_run_out_for_a_peer(redis_client):
    """A scheduler process that is alive but no longer renews its lock (stuck) is not kept in office by
    its worker: the worker's maintenance takes the lock only when its own scheduler is not running, so
    the lock runs out and a peer's maintenance takes over."""
    queue = Queue("smartcar-events", connection=redis_client)
    scheduler = _Deaf([queue], connection=redis_client)
    scheduler.acquire_locks()
    process = scheduler.start()
    try:
        lock = PatientScheduler.get_locking_key(queue.name)
        redis_client.expire(lock, 5)  # what is left of it once the stuck process stopped renewing
        housekeeping = Housekeeping(SimpleWorker([queue], connection=redis_client), queue, list)
        housekeeping.scheduler = scheduler
        housekeeping._maintain()
        assert 0 < redis_client.ttl(lock) <= 5
    finally:
        process.kill()
        process.join()


class _Deaf(PatientScheduler):
    def work(self) -> None:
        time.sleep(60)
