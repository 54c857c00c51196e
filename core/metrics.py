"""Prometheus metrics shared by the web and worker processes. Labels carry outcomes and reasons only,
never an id or a secret: cardinality stays fixed and nothing identifying leaves the process."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from core.errors import PARK_REASONS

DELIVERIES = Counter(
    "smartcar_ingest_deliveries",
    "Webhook deliveries by outcome (accepted, duplicate, verify, parked_<reason>, rejected_<code>, unavailable, "
    "spooled, spool_full, internal_error).",
    ["outcome"],
)

REQUEST_SECONDS = Histogram(
    "smartcar_ingest_webhook_request_seconds",
    "Time spent handling POST /webhooks/smartcar, from first byte read to response built.",
    # Up to 15 s, where Smartcar counts a delivery as failed: its advice is to alert past 10 s.
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0),
)

ENQUEUE_BATCH_SIZE = Histogram(
    "smartcar_ingest_enqueue_batch_size",
    "Deliveries written to Redis per round trip by the web's group commit.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

# Every web process drains the same SPOOL_DIR and counts it each second: the latest count stands.
SPOOL_BYTES = Gauge(
    "smartcar_ingest_spool_bytes",
    "Bytes of verified deliveries in SPOOL_DIR waiting to be drained into Redis (refused at SPOOL_MAX_BYTES).",
    multiprocess_mode="mostrecent",
)

SPOOL_FAILED_FILES = Gauge(
    "smartcar_ingest_spool_failed_files",
    "Spool files the last drain pass could not drain for a reason other than Redis (kept, tried again each second).",
    multiprocess_mode="mostrecent",
)

# --- Worker side ------------------------------------------------------------------------------

JOBS = Counter(
    "smartcar_ingest_jobs",
    "Ingest jobs by outcome (published, already_published, parked_<reason>, retried, error).",
    ["outcome"],
)

END_TO_END_SECONDS = Histogram(
    "smartcar_ingest_end_to_end_seconds",
    "Time from the webhook's receipt (receivedAt) to the entry on the output stream (publishedAt).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0, 1800.0, 3600.0),
)

#: The ``endpoint`` label: a template, never a URL, so no vehicle id reaches a label.
SMARTCAR_ENDPOINTS = ("token", "vehicle", "signals", "signal", "connections")

SMARTCAR_CALLS = Counter(
    "smartcar_ingest_smartcar_calls",
    "HTTP requests to Smartcar by endpoint template and answer (HTTP status, or network_error).",
    ["endpoint", "status"],
)

SMARTCAR_CALL_SECONDS = Histogram(
    "smartcar_ingest_smartcar_call_seconds",
    "Duration of one HTTP request to Smartcar, by endpoint template (network errors included).",
    ["endpoint"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0),
)

SMARTCAR_RETRIES = Counter(
    "smartcar_ingest_smartcar_retries",
    "Reads from Smartcar retried by the client after a transient failure (429, 5xx, network), by endpoint.",
    ["endpoint"],
)

TOKEN_REFRESHES = Counter(
    "smartcar_ingest_token_refreshes",
    "Requests this process made to the token endpoint (successful or not).",
)

#: Where an event's vehicle and signals came from (the ``source`` of ``enrichment.reads``).
READ_CALLS = ("vehicle", "signals")
READ_SOURCES = ("fetched", "cached", "shared", "skipped")
#: Why a request waited or was not sent: the deployment's budget, or a 429's pause.
LIMITER_CAUSES = ("budget", "vehicle", "application")

ENRICHMENT_READS = Counter(
    "smartcar_ingest_enrichment_reads",
    "Vehicle and signals reads by the events, by source: fetched (its own call), cached, shared "
    "(another event's call in flight) or skipped (rate limited).",
    ["call", "source"],
)

LIMITER_WAIT_SECONDS = Histogram(
    "smartcar_ingest_limiter_wait_seconds",
    "How long a Smartcar request waited for the request budget or a 429's pause before it was sent, by cause.",
    ["cause"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0),
)

LIMITER_DENIALS = Counter(
    "smartcar_ingest_limiter_denials",
    "Smartcar requests not sent because the budget or a pause would have held them past ENRICH_WAIT_SECONDS.",
    ["cause"],
)

RATE_LIMITED = Counter(
    "smartcar_ingest_rate_limited",
    "429 answers from Smartcar by scope: vehicle (RATE_LIMIT:VEHICLE) or application (RATE_LIMIT:SMARTCAR_API).",
    ["scope"],
)


def observe_smartcar_call(endpoint: str, status: str, started: float) -> None:
    """Count one HTTP request to Smartcar and its duration since ``started`` (``time.perf_counter``)."""
    SMARTCAR_CALL_SECONDS.labels(endpoint=endpoint).observe(time.perf_counter() - started)
    SMARTCAR_CALLS.labels(endpoint=endpoint, status=status).inc()


def totals(metric: Counter | Histogram, sample: str = "_total") -> dict[tuple[str, ...], float]:
    """What ``metric`` holds in this process by label values; ``sample="_sum"``: a histogram's sums."""
    return {
        tuple(found.labels.values()): found.value
        for family in metric.collect()
        for found in family.samples
        if found.name.endswith(sample)
    }


# Series that exist from the start read as 0 instead of missing, so rate() and alerts see the
# first increment of each.
for _outcome in ("published", "already_published", "retried", "error", *(f"parked_{r}" for r in PARK_REASONS)):
    JOBS.labels(outcome=_outcome)
for _endpoint in SMARTCAR_ENDPOINTS:
    SMARTCAR_CALL_SECONDS.labels(endpoint=_endpoint)
    if _endpoint != "token":  # a failed token request is retried as part of the read that needed it
        SMARTCAR_RETRIES.labels(endpoint=_endpoint)
for _call in READ_CALLS:
    for _source in READ_SOURCES:
        ENRICHMENT_READS.labels(call=_call, source=_source)
for _cause in LIMITER_CAUSES:
    LIMITER_DENIALS.labels(cause=_cause)
    LIMITER_WAIT_SECONDS.labels(cause=_cause)
for _scope in ("vehicle", "application"):
    RATE_LIMITED.labels(scope=_scope)
