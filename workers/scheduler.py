"""RQ's scheduler, in a process the worker forks: patient with Redis, and never outliving the worker
(docs/architecture.md, "Design notes")."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import redis
from rq.scheduler import RQScheduler

from core.logs import get_logger
from core.redis.outage import until_redis_answers

log = get_logger("smartcar_ingest.worker")

#: How long the worker's stop waits for its scheduler's process to end before killing it.
STOP_SECONDS = 10.0


class PatientScheduler(RQScheduler):
    """RQ's scheduler, whose process waits out Redis trouble instead of ending on it, and ends when
    the worker asks (SIGTERM) or is gone."""

    #: The worker's pid, recorded as it forks the scheduler's process.
    _worker_pid = 0

    def start(self) -> BaseProcess:
        self._worker_pid = os.getpid()
        process: BaseProcess = super().start()  # type: ignore[no-untyped-call]
        return process

    def work(self) -> None:
        self._install_signal_handlers()  # type: ignore[no-untyped-call]
        # The fork kept the worker's event loop as this process's signal wakeup fd: a signal sent to
        # the scheduler alone would be handled by the worker's loop as well.
        signal.set_wakeup_fd(-1)
        self._patiently(self.register_birth)
        while not self._stopping():
            if self.should_reacquire_locks:
                self._patiently(self.acquire_locks)
            self._patiently(self.heartbeat)
            self._patiently(self.enqueue_scheduled_jobs)
            time.sleep(self.interval)
        if self._orphaned():
            log.warning("scheduler stopping: its worker is gone", worker=self._worker_pid)
        try:
            self.stop()  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            log.warning("scheduler stopped without releasing its locks", error=type(exc).__name__)

    def stop_process(self) -> None:
        """In the worker: SIGTERM the scheduler's process and wait for it, killing it after :data:`STOP_SECONDS`."""
        process = self._process
        if process is None:
            return
        process.terminate()
        process.join(STOP_SECONDS)
        if process.is_alive():
            log.warning("scheduler did not stop; killing it", pid=process.pid)
            process.kill()
            process.join()

    def running(self) -> bool:
        """In the worker: True while the scheduler's process it forked is alive."""
        return self._process is not None and self._process.is_alive()

    def _orphaned(self) -> bool:
        """True once the worker that forked this process is gone (the process then has another parent)."""
        return os.getppid() != self._worker_pid

    def _stopping(self) -> bool:
        return self._stop_requested or self._orphaned()

    def _patiently(self, step: Callable[[], object]) -> None:
        try:
            until_redis_answers(step, stop=self._stopping)
        except redis.RedisError:
            if not self._stopping():
                raise
