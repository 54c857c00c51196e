"""The baseline worker: RQ's stock SimpleWorker running the straightforward sequential job.

This is the job an integrator writes first: parse the body with pydantic, look the user up,
then call Smartcar with a blocking client, one request after the other, and XADD the result.
Run as ``python -m bench.baseline --burst`` with the same settings as the real worker.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx
import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from core.config import Settings
from core.events.parse import parse_document
from core.store.users import UserStore

_state: dict[str, Any] = {}


def sequential_process_event(payload: dict[str, Any]) -> None:
    settings = _state.setdefault("settings", Settings())
    http: httpx.Client = _state.setdefault("http", httpx.Client(timeout=15))
    store: UserStore = _state.setdefault("users", UserStore(settings.database_url))
    out: redis.Redis = _state.setdefault("redis", redis.Redis.from_url(settings.redis_url))
    body = payload["body"]  # the edge embeds the delivery itself: RQ hands it over parsed
    event = parse_document(body if isinstance(body, dict) else json.loads(body))
    user = store.find_by_smartcar_user_id(event.smartcar_user_id)
    if "token" not in _state or _state["token_expires"] < time.time():
        answer = http.post(
            settings.smartcar_token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": settings.smartcar_client_id,
                "client_secret": settings.smartcar_client_secret.get_secret_value()
                if settings.smartcar_client_secret
                else "",
            },
        ).json()
        _state["token"], _state["token_expires"] = answer["access_token"], time.time() + answer["expires_in"] - 300
    headers = {"authorization": f"Bearer {_state['token']}", "sc-user-id": event.smartcar_user_id}
    base = settings.smartcar_api_url
    vehicle = http.get(f"{base}/vehicles/{event.vehicle.id}", headers=headers).json()
    signals = http.get(f"{base}/vehicles/{event.vehicle.id}/signals", headers=headers).json()
    document = {"eventId": event.event_id, "user": user.id if user else None, "vehicle": vehicle, "signals": signals}
    out.xadd(settings.output_stream, {"event_id": event.event_id, "payload": json.dumps(document)})


if __name__ == "__main__":
    settings = Settings()
    connection = redis.Redis.from_url(settings.redis_url)
    queue = Queue("bench-baseline", connection=connection, serializer=JSONSerializer)
    # The jobs in this queue name workers.jobs.process_event; point them at the sequential job.
    for job in queue.get_jobs():
        args = job.args  # decode the call first: changing func_name rebuilds the data from it
        job.func_name = "bench.baseline.sequential_process_event"
        job.args = args
        job.save()
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    sys.exit(0 if worker.work(burst="--burst" in sys.argv) else 1)
