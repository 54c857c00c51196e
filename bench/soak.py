"""``make soak``: ten minutes of traffic through real processes while workers and Redis are killed.

Not part of ``make test``. One web process, three workers (the first is never killed, so its
memory can be watched over the whole run; the other two are SIGKILLed in turn and restarted, as
an orchestrator would), the Smartcar emulator in its own process, and a Redis with AOF that is
SIGKILLed and restarted from its AOF on a schedule. A sender posts signed events like Smartcar
(a non-2xx is retried until it gets a 2xx). At the end the sender stops, the pipeline is given
time to drain, and the figures are printed and written to docs/reliability.md between the
``SOAK:BEGIN`` and ``SOAK:END`` markers: acknowledged, published, duplicates, missing, and the
workers' resident memory over time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import redis

from bench.__main__ import machine
from cli.processes import seed_users
from core.redis.queue_metrics import read_stranded
from core.store import db
from tests.drills.common import Sender, wait_until
from tests.pipeline import pipeline_settings, worker_env
from tests.procs import RedisServer, free_port, wait_for_port

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
OUTPUT = "smartcar:vehicle-events"


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    process.wait(timeout=60)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Soak:
    def __init__(self, minutes: float, rate: float) -> None:
        self.minutes = minutes
        self.pause = 1.0 / rate
        self.tmp = Path(tempfile.mkdtemp(prefix="smartcar-ingest-soak-"))
        self.redis = RedisServer(appendonly=True)
        self.emulator_port, self.web_port = free_port(), free_port()
        self.workers: list[subprocess.Popen[bytes] | None] = [None, None, None]
        self.samples: list[dict[str, object]] = []
        self.events: Counter[str] = Counter()
        self._lock = threading.Lock()

    def run(self) -> list[dict[str, object]]:
        self.redis.start()
        database = f"sqlite:///{self.tmp / 'users.db'}"
        db.upgrade(database)
        seed_users(database)
        emulator_url = f"http://127.0.0.1:{self.emulator_port}"
        settings = pipeline_settings(self.redis.url, emulator_url, database, job_retries=5)
        env = worker_env(settings) | {"SMARTCAR_MANAGEMENT_TOKEN": "test-management-token"}
        emulator = _spawn(["emulator", "--port", str(self.emulator_port), "--latency", "0.05"], env)
        web = _spawn(["web", "--host", "127.0.0.1", "--port", str(self.web_port)], env | {"ADMIN_PORT": "0"})
        wait_for_port(self.emulator_port, 30)
        wait_for_port(self.web_port, 30)
        self._env = env
        for slot in range(3):
            self._start_worker(slot)
        # More events than the run can send; the sender is stopped by the clock.
        sender = Sender(f"http://127.0.0.1:{self.web_port}", int(self.minutes * 60 / self.pause * 1.2), self.pause)
        stop = threading.Event()
        started = time.monotonic()
        monitor = threading.Thread(target=self._monitor, args=(sender, started, stop), daemon=True)
        chaos = threading.Thread(target=self._chaos, args=(started, stop), daemon=True)
        try:
            sender.thread.start()
            monitor.start()
            chaos.start()
            while time.monotonic() - started < self.minutes * 60:
                time.sleep(1)
            stop.set()
            chaos.join()
            sender.stop.set()  # the event in hand is still delivered
            sender.thread.join(timeout=120)
            drained_from = time.monotonic()
            client = redis.Redis.from_url(self.redis.url)
            wait_until(lambda: client.xlen(OUTPUT) >= len(sender.acknowledged), 300, 1.0)
            drained = time.monotonic() - drained_from
            time.sleep(5)  # a late duplicate would show here
            self._sample(sender, started)
            published = [fields[b"event_id"].decode() for _, fields in client.xrange(OUTPUT)]
            parked = client.xlen("smartcar:parked")
            client.close()
        finally:
            stop.set()
            for worker in self.workers:
                if worker is not None:
                    _kill(worker, signal.SIGTERM)
            _kill(web, signal.SIGTERM)
            _kill(emulator)
            self.redis.cleanup()
        acknowledged = set(sender.acknowledged)
        summary = {
            "minutes": self.minutes,
            "acknowledged": len(acknowledged),
            "refused_attempts": sender.refusals,
            "published": len(published),
            "distinct_published": len(set(published)),
            "duplicates": len(published) - len(set(published)),
            "missing": len(acknowledged - set(published)),
            "parked": parked,
            "drained_seconds_after_last_send": round(drained, 1),
            **self.events,
        }
        self.samples.append(summary)
        return self.samples

    def _start_worker(self, slot: int) -> None:
        port = free_port()
        self.workers[slot] = _spawn(["worker", "--concurrency", "32"], self._env | {"METRICS_PORT": str(port)})

    def _chaos(self, started: float, stop: threading.Event) -> None:
        """Every 45 s a killable worker is SIGKILLed and restarted; every 100 s Redis is SIGKILLed and restarted."""
        rng = random.Random(12)
        next_worker, next_redis, turn = 45.0, 100.0, 0
        while not stop.wait(1.0):
            elapsed = time.monotonic() - started
            if elapsed >= next_worker:
                slot = 1 + turn % 2
                turn += 1
                worker = self.workers[slot]
                if worker is not None:
                    _kill(worker)
                self.events["worker_kills"] += 1
                time.sleep(rng.uniform(1.0, 5.0))
                self._start_worker(slot)
                next_worker += 45.0
            if elapsed >= next_redis:
                self.redis.stop(kill=True)
                time.sleep(rng.uniform(1.0, 4.0))
                self.redis.start()
                self.events["redis_restarts"] += 1
                next_redis += 100.0

    def _monitor(self, sender: Sender, started: float, stop: threading.Event) -> None:
        while not stop.wait(30.0):
            self._sample(sender, started)

    def _sample(self, sender: Sender, started: float) -> None:
        row: dict[str, object] = {"minute": round((time.monotonic() - started) / 60, 1)}
        row["acknowledged"] = len(sender.acknowledged)
        try:
            client = redis.Redis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=2)
            row["published"] = client.xlen(OUTPUT)
            row["stranded"] = read_stranded(client, "smartcar-events", dt.datetime.now(dt.UTC))["count"]
            client.close()
        except (redis.RedisError, OSError):
            row["published"] = row["stranded"] = "Redis down"
        for slot, worker in enumerate(self.workers):
            row[f"worker{slot}_rss_mb"] = round(_rss_mb(worker.pid), 1) if worker is not None else 0.0
        with self._lock:
            self.samples.append(row)
        print(row, flush=True)


def table(samples: list[dict[str, object]]) -> str:
    rows = samples[:-1]
    summary = samples[-1]
    lines = [
        "| minute | acknowledged | published | stranded | worker 0 RSS (never killed) | worker 1 RSS | worker 2 RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['minute']} | {row['acknowledged']} | {row['published']} | {row['stranded']} "
            f"| {row['worker0_rss_mb']} MB | {row['worker1_rss_mb']} MB | {row['worker2_rss_mb']} MB |"
        )
    figures = ", ".join(f"{key} {value}" for key, value in summary.items())
    return "Totals: " + figures + ".\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=40.0, help="events per second the sender aims at")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/reliability.md alone")
    args = parser.parse_args()
    samples = Soak(args.minutes, args.rate).run()
    text = f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.\n\n" + table(samples)
    print("\n" + text)
    if not args.no_write and DOC.exists():
        doc = DOC.read_text()
        block = f"<!-- SOAK:BEGIN -->\n{text}\n<!-- SOAK:END -->"
        DOC.write_text(re.sub(r"<!-- SOAK:BEGIN -->.*<!-- SOAK:END -->", lambda _: block, doc, flags=re.S))


if __name__ == "__main__":
    main()
