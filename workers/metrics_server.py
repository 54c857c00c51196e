"""The worker's Prometheus endpoint: ``/metrics`` on ``ADMIN_HOST``:``METRICS_PORT`` (0 turns it off),
this process's counters and the queue gauges read from Redis at scrape time (docs/deploy.md,
"Observability"; docs/architecture.md, "Design notes")."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from core.config import Settings
from core.logs import get_logger
from core.redis.queue_metrics import QueueCollector, endpoint_registry

log = get_logger("smartcar_ingest.worker")


@dataclass
class WorkerMetrics:
    """A running metrics endpoint; :meth:`close` stops it and closes the queue collector."""

    server: WSGIServer
    thread: threading.Thread
    collector: QueueCollector

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.collector.close()


def start_worker_metrics(settings: Settings) -> WorkerMetrics | None:
    """Serve ``/metrics`` in a daemon thread; None when ``METRICS_PORT`` is 0, or taken (logged: the
    worker then runs without metrics)."""
    if settings.metrics_port == 0:
        return None
    collector = QueueCollector(settings)
    try:
        server, thread = start_http_server(
            settings.metrics_port, addr=settings.admin_host, registry=endpoint_registry(collector)
        )
    except OSError as exc:
        collector.close()
        log.warning(
            "worker metrics not served: METRICS_PORT is unavailable",
            port=settings.metrics_port,
            error=type(exc).__name__,
        )
        return None
    log.info("worker metrics served", host=settings.admin_host, port=settings.metrics_port, path="/metrics")
    return WorkerMetrics(server, thread, collector)
