"""Concurrent redeliveries of one eventId, over real HTTP: exactly one job."""

from __future__ import annotations

import asyncio

import httpx
from rq import Queue
from rq.serializers import JSONSerializer

from core.samples import encode, sample_event
from service.app import create_app
from tests.conftest import signed_headers
from tests.procs import LiveServer


def test_racing_redeliveries_enqueue_exactly_one_job(settings, redis_client):
    """Fifty simultaneous deliveries of one event: one accepted, the rest duplicates, one job."""
    documents = [sample_event() for _ in range(5)]
    for document in documents[1:]:
        document["eventId"] = documents[0]["eventId"]  # same event, different deliveryId

    async def storm(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def one(i: int) -> str:
                body = encode(documents[i % len(documents)])
                response = await http.post("/webhooks/smartcar", content=body, headers=signed_headers(body))
                assert response.status_code == 202
                return str(response.json()["status"])

            return await asyncio.gather(*(one(i) for i in range(50)))

    with LiveServer(create_app(settings)) as server:
        statuses = asyncio.run(storm(server.url))
    assert statuses.count("accepted") == 1
    assert statuses.count("duplicate") == 49
    queue = Queue(settings.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    assert queue.job_ids == [documents[0]["eventId"]]


def test_many_distinct_events_each_get_one_job(settings, redis_client):
    """Concurrent distinct events are all accepted and all queued."""
    documents = [sample_event() for _ in range(100)]

    async def send(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def one(document: dict) -> None:
                body = encode(document)
                response = await http.post("/webhooks/smartcar", content=body, headers=signed_headers(body))
                assert response.json()["status"] == "accepted"

            await asyncio.gather(*(one(d) for d in documents))

    with LiveServer(create_app(settings)) as server:
        asyncio.run(send(server.url))
    queue = Queue(settings.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    assert sorted(queue.job_ids) == sorted(d["eventId"] for d in documents)
