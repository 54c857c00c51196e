"""RQ's scheduler, made to outlive Redis trouble like the rest of the worker."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from rq.scheduler import RQScheduler

from core.logs import get_logger
from core.redis.outage import until_redis_answers

log = get_logger("smartcar_ingest.worker")


class PatientScheduler(RQScheduler):
    """RQ's scheduler, whose process waits out Redis trouble instead of ending on it.

    RQ's own loop lets any Redis error end the scheduler process; the worker restarts it at its
    next maintenance pass, so due retries could wait a minute or more after Redis returned.
    """

    def work(self) -> None:
        self._install_signal_handlers()  # type: ignore[no-untyped-call]
        self._patiently(self.register_birth)
        while not self._stop_requested:
            if self.should_reacquire_locks:
                self._patiently(self.acquire_locks)
            self._patiently(self.heartbeat)
            self._patiently(self.enqueue_scheduled_jobs)
            time.sleep(self.interval)
        try:
            self.stop()  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            log.warning("scheduler stopped without releasing its locks", error=type(exc).__name__)

    def _patiently(self, step: Callable[[], object]) -> None:
        try:
            until_redis_answers(step, stop=lambda: self._stop_requested)
        except redis.RedisError:
            if not self._stop_requested:
                raise
