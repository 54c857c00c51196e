"""Drill: ten thousand hostile requests over real HTTP: no 5xx, no forgery accepted, bounded memory.

A second drill replays the JSON-scalar signing oracle: unsigned VERIFY challenges such as ``123``
or ``true`` are refused, and the signed scalars and arrays they would have produced are refused
too, so nothing reaches the parked stream or the queue.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from rq import Queue
from rq.serializers import JSONSerializer

from cli.samples import encode, sample_event
from core.signatures import sign
from tests.drills.common import report
from tests.procs import WebProcess, service_env

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
            body = rng.choice(
                [rng.randbytes(200), b"{", b"[]", b'{"eventType":"VEHICLE_STATE"}', b"\xff\xfe", b"123", b"null"]
            )
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


@contextlib.contextmanager
def web_process(redis_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``smartcar-ingest web`` in its own process, and the free port it serves on."""
    env = service_env(
        SMARTCAR_MANAGEMENT_TOKEN=TOKEN,
        REDIS_URL=redis_url,
        MAX_BODY_BYTES="65536",
        BODY_TIMEOUT_SECONDS="1",
        LOG_LEVEL="ERROR",
        ADMIN_PORT="0",
    )
    with WebProcess(env, cwd=tmp_path) as web:
        yield web.process, web.port


def test_ten_thousand_hostile_requests(redis_url, redis_client, tmp_path):
    """10,000 hostile requests: zero 5xx, zero forgeries queued, every 4xx a JSON error, memory bounded."""
    statuses: dict[int, int] = {}
    genuine: list[str] = []
    with web_process(redis_url, tmp_path) as (web, port):
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


#: JSON scalars that fit the token-like challenge characters, each a body the edge could parse.
SCALARS = ["123", "-1", "0.5", "true", "null", "1e5", "false", "-0", "1E+2", "9" * 256, "9" * 4400]
NON_OBJECTS = [*SCALARS, '"text"', "[]", "[1, 2, 3]", '[{"eventId": "e-1"}]', "  123  "]


def test_json_scalar_signing_oracle_is_closed(redis_url, redis_client, tmp_path):
    """Unsigned scalar challenges get 401; signed scalars and arrays get 400; 1,000 replays park and queue nothing."""
    outcomes: dict[str, int] = {}
    with web_process(redis_url, tmp_path) as (_, port), httpx.Client(timeout=10) as client:
        url = f"http://127.0.0.1:{port}/webhooks/smartcar"
        for challenge in SCALARS:
            body = encode(sample_event("VERIFY", challenge=challenge))
            response = client.post(url, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 401, (challenge[:20], response.text)
            assert sign(TOKEN.encode(), challenge.encode()) not in response.text
        # What an attacker would hold had the oracle answered: valid signatures of bare JSON values.
        for text in NON_OBJECTS:
            body = text.encode()
            response = client.post(url, content=body, headers={"sc-signature": sign(TOKEN.encode(), body)})
            code = response.json()["error"]["code"]
            outcomes[code] = outcomes.get(code, 0) + 1
            assert response.status_code == 400, (text[:20], response.text)
            # 4,400 digits exceed the JSON parser's number limit: not JSON at all.
            assert code == ("malformed_json" if len(text) > 4300 else "not_an_object")
        replay = b"123"
        headers = {"sc-signature": sign(TOKEN.encode(), replay)}
        started = time.monotonic()
        for _ in range(1000):
            assert client.post(url, content=replay, headers=headers).status_code == 400
        replay_seconds = time.monotonic() - started
    queued = Queue("smartcar-events", connection=redis_client, serializer=JSONSerializer).job_ids
    report(
        "json scalar oracle",
        unsigned_scalar_challenges=len(SCALARS),
        signed_non_objects=dict(sorted(outcomes.items())),
        replays=1000,
        replay_seconds=round(replay_seconds, 2),
        parked=redis_client.xlen("smartcar:parked"),
        queued=len(queued),
    )
    assert redis_client.xlen("smartcar:parked") == 0
    assert queued == []
