"""The spool: verified deliveries kept on local disk while Redis cannot take them.

Smartcar gives up on a delivery about three minutes after its first attempt, so a longer Redis
outage would lose events at the source. With ``SPOOL_DIR`` set, the web process appends each
verified delivery it cannot enqueue to an append-only file, fsyncs it, and only then answers
202 ``spooled``. A drainer moves spooled deliveries into Redis once it answers again, through
the same dedupe-and-enqueue step as live traffic, so a delivery spooled and also redelivered
still ends as one job.

File format: one record after another, each ``MAGIC | length (4 bytes, big-endian) | CRC32 of
the payload (4 bytes) | payload (UTF-8 JSON)``. A crash can tear only the last record; reading
stops there, reports it, and never applies half a record.

Files: each process appends to ``spool-<host>-<pid>.log``. To drain, the file is renamed to a
unique ``*.<ns>.draining`` name (new deliveries then start a fresh file), its records are
enqueued, and it is deleted. A drainer that dies midway leaves the ``.draining`` file for the next pass; records
already enqueued are recognised by the dedupe and not queued twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError

MAGIC = b"SCI1"
_HEADER = struct.Struct(">4sII")


@dataclass(frozen=True)
class SpooledDelivery:
    """One delivery as spooled: enough to enqueue it, or to park it, later."""

    event_id: str | None
    event_type: str
    body: str
    received_at_ms: int
    park_reason: str | None = None
    park_detail: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SpooledDelivery:
        data: dict[str, Any] = json.loads(raw)
        return cls(**data)


@dataclass
class ReadReport:
    records: int = 0
    torn_tail_bytes: int = 0


def encode_record(delivery: SpooledDelivery) -> bytes:
    payload = delivery.to_json()
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(path: Path, report: ReadReport | None = None) -> Iterator[SpooledDelivery]:
    """The whole records of a spool file, in order; a torn or corrupt tail ends the read."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        header = data[offset : offset + _HEADER.size]
        if len(header) < _HEADER.size:
            break
        magic, length, crc = _HEADER.unpack(header)
        payload = data[offset + _HEADER.size : offset + _HEADER.size + length]
        if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            break
        offset += _HEADER.size + length
        if report is not None:
            report.records += 1
        yield SpooledDelivery.from_json(payload)
    if report is not None:
        report.torn_tail_bytes = len(data) - offset


class Spool:
    """The spool directory of one process. ``append`` is blocking: call it from a thread."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"SPOOL_DIR {self.directory} cannot be created ({exc.strerror}).") from None
        if not os.access(self.directory, os.W_OK):
            raise ConfigurationError(f"SPOOL_DIR {self.directory} is not writable.")
        self._path = self.directory / f"spool-{socket.gethostname()}-{os.getpid()}.log"
        self._lock = threading.Lock()

    def append(self, delivery: SpooledDelivery) -> None:
        """Write one record and fsync it; when this returns, the delivery survives a crash."""
        record = encode_record(delivery)
        with self._lock:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sync_directory()

    def pending(self) -> list[Path]:
        """Spool files waiting to be drained (this process's and any left by others)."""
        found = [*self.directory.glob("spool-*.log"), *self.directory.glob("spool-*.draining")]
        return sorted(p for p in found if p.is_file())

    def claim(self, path: Path) -> Path | None:
        """Rename ``path`` for draining so appends move to a fresh file; None if it vanished."""
        if path.suffix == ".draining":
            return path
        # A unique name: a file claimed earlier and not yet drained (Redis went away mid-drain)
        # must never be overwritten by the next claim.
        target = path.with_name(f"{path.name}.{time.time_ns()}.draining")
        with self._lock:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                # Wait for an appender in another process to finish its record.
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.replace(path, target)
            finally:
                os.close(fd)
            self._sync_directory()
        return target

    def finish(self, path: Path) -> None:
        """Delete a drained file."""
        path.unlink(missing_ok=True)
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
