"""The two baselines the ingest benchmark runs beside our endpoint, as uvicorn factories.

* ``bare``: Starlette answering 200 to every POST, the server's ceiling.
* ``typical``: what an integrator usually writes: verify the signature, validate with pydantic,
  ``Queue.enqueue`` per request (synchronous redis-py in Starlette's threadpool).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from pydantic import BaseModel
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def bare() -> Starlette:
    async def ok(request: Request) -> Response:
        await request.body()
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/webhooks/smartcar", ok, methods=["POST"])])


class _User(BaseModel):
    id: str


class _Vehicle(BaseModel):
    id: str


class _Data(BaseModel):
    user: _User
    vehicle: _Vehicle
    signals: list[dict[str, Any]] = []


class _Event(BaseModel):
    eventId: str
    eventType: str
    data: _Data


def typical() -> Starlette:
    token = os.environ["SMARTCAR_MANAGEMENT_TOKEN"].encode()
    redis = Redis.from_url(os.environ["REDIS_URL"])
    queue = Queue(os.environ.get("INGEST_QUEUE", "smartcar-events"), connection=redis, serializer=JSONSerializer)

    async def webhook(request: Request) -> Response:
        body = await request.body()
        expected = hmac.new(token, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("sc-signature", "")):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        event = _Event.model_validate_json(body)
        # Starlette runs this blocking call in its threadpool, as a sync endpoint would.
        await run_in_threadpool(queue.enqueue, "workers.jobs.process_event", body.decode(), job_id=event.eventId)
        return JSONResponse({"status": "accepted", "eventId": event.eventId}, status_code=202)

    return Starlette(routes=[Route("/webhooks/smartcar", webhook, methods=["POST"])])
