"""Drill: ten thousand hostile requests over real HTTP: no 5xx, no forgery accepted, bounded memory."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rq import Queue
from rq.serializers import JSONSerializer

from core.samples import encode, sample_event
from core.signatures import sign
from tests.drills.common import report
from tests.procs import free_port, wait_for_port

TOKEN = "hostile-drill-token"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hostile_requests(rng: random.Random, count: int):
    """(body, headers, is_validly_signed) triples: garbage, forgeries, near misses and real events."""
    good = encode(sample_event())
    for i in range(count):
        kind = i % 8
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 3000))
            yield body, {"sc-signature": rng.randbytes(32).hex()}, False
        elif kind == 1:  # a real event signed with the wrong key: a forgery
            body = encode(sample_event())
            yield body, {"sc-signature": sign(b"attacker", body)}, False
        elif kind == 2:  # a valid signature moved onto a modified body
            body = good.replace(b"81", b"18")
            yield body, {"sc-signature": sign(TOKEN.encode(), good)}, False
        elif kind == 3:  # header garbage: non-hex, wrong length, odd encodings
            header = rng.choice(["", "zz" * 32, "0" * 63, "é" * 10, "sha256=" + "0" * 64, "a\tb" * 16])
            yield good, {"sc-signature": header.encode("utf-8")}, False
        elif kind == 4:  # signed garbage and signed near misses
            body = rng.choice([rng.randbytes(200), b"{", b"[]", b'{"eventType":"VEHICLE_STATE"}', b"\xff\xfe"])
            yield body, {"sc-signature": sign(TOKEN.encode(), body)}, True
        elif kind == 5:  # the signing-oracle attempt
            body = encode(sample_event("VERIFY", challenge=encode(sample_event()).decode()))
            yield body, {}, False
        elif kind == 6:  # oversized
            body = b"x" * (70_000 + rng.randint(0, 1000))
            yield body, {"sc-signature": sign(TOKEN.encode(), body)}, True
        else:  # a genuine event, validly signed
            body = encode(sample_event())
            yield body, {"sc-signature": sign(TOKEN.encode(), body)}, True


def test_ten_thousand_hostile_requests(redis_url, redis_client, tmp_path):
    """10,000 hostile requests: zero 5xx, zero forgeries queued, every 4xx a JSON error, memory bounded."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "REDIS_"))}
    env |= {
        "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
        "REDIS_URL": redis_url,
        "MAX_BODY_BYTES": "65536",
        "BODY_TIMEOUT_SECONDS": "1",
        "LOG_LEVEL": "ERROR",
        "PYTHONPATH": os.getcwd(),
    }
    web = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "web", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path
    )
    statuses: dict[int, int] = {}
    genuine: list[str] = []
    try:
        wait_for_port(port, timeout=30)
        rng = random.Random(1234)
        url = f"http://127.0.0.1:{port}/webhooks/smartcar"
        with httpx.Client(timeout=10) as client:
            for _ in range(300):  # warm-up, so the memory baseline includes imports and pools
                body = encode(sample_event())
                client.post(url, content=body, headers={"sc-signature": sign(TOKEN.encode(), body)})
            redis_client.flushall()
            before = rss_mb(web.pid)
            for body, headers, _ in hostile_requests(rng, 10_000):
                response = client.post(url, content=body, headers=headers)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, response.text
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"code", "message"}
                elif response.status_code == 202 and response.json().get("status") == "accepted":
                    genuine.append(response.json()["eventId"])
            after = rss_mb(web.pid)
        slow_sender = slowloris(port)
    finally:
        web.terminate()
        web.wait(timeout=20)
    queued = Queue("smartcar-events", connection=redis_client, serializer=JSONSerializer).job_ids
    report(
        "hostile input",
        requests=sum(statuses.values()),
        statuses=dict(sorted(statuses.items())),
        five_xx=sum(n for s, n in statuses.items() if s >= 500),
        forgeries_queued=len(set(queued) - set(genuine)),
        rss_growth_mb=round(after - before, 1),
        slow_sender=slow_sender,
    )
    assert sum(statuses.values()) == 10_000
    assert sorted(queued) == sorted(genuine)  # only genuine, validly signed events were queued
    assert len(genuine) == 1250
    assert after - before < 64  # no unbounded growth
    assert slow_sender == 408


def slowloris(port: int) -> int:
    """Send headers and a trickle of the body, then stall: the server must answer 408 and move on."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /webhooks/smartcar HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"eventId":'
        )
        started = time.monotonic()
        answer = sock.recv(200)
        assert time.monotonic() - started < 8
    return int(answer.split()[1])
