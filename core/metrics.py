"""Prometheus metrics shared by the web and worker processes.

Labels carry outcomes and reasons only: never a user id, vehicle id, event id or secret, so
cardinality stays fixed and nothing identifying leaves the process.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

DELIVERIES = Counter(
    "smartcar_ingest_deliveries",
    "Webhook deliveries by outcome (accepted, duplicate, verify, parked_<reason>, rejected_<code>, unavailable).",
    ["outcome"],
)

REQUEST_SECONDS = Histogram(
    "smartcar_ingest_webhook_request_seconds",
    "Time spent handling POST /webhooks/smartcar, from first byte read to response built.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

ENQUEUE_BATCH_SIZE = Histogram(
    "smartcar_ingest_enqueue_batch_size",
    "Deliveries written to Redis per round trip by the web's group commit.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
