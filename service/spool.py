"""The spool: verified deliveries kept on local disk (``SPOOL_DIR``) while Redis cannot take them,
until the drainer (:mod:`service.drain`) moves them into Redis. Record format, file life cycle and
the size bound: docs/reliability.md, "Spool file safety", and docs/security.md (``SPOOL_MAX_BYTES``)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Generator
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


class SpoolFull(OSError):
    """Spooling one more delivery would take the spool directory past ``SPOOL_MAX_BYTES``."""


@dataclass
class ReadReport:
    records: int = 0
    torn_tail_bytes: int = 0


def encode_record(delivery: SpooledDelivery) -> bytes:
    payload = delivery.to_json()
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(path: Path, report: ReadReport | None = None) -> Generator[SpooledDelivery, None, None]:
    """The whole records of a spool file, in order, one at a time.

    A torn or corrupt record (a length past the end of the file included) ends the read;
    ``report.torn_tail_bytes`` then says how many bytes were left unread (set once the iterator is
    exhausted). Close the iterator (or exhaust it) to close the file.
    """
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        offset = 0
        while offset < size:
            header = handle.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            magic, length, crc = _HEADER.unpack(header)
            if magic != MAGIC or length > size - offset - _HEADER.size:
                break
            payload = handle.read(length)
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            try:
                delivery = SpooledDelivery.from_json(payload)
            except (ValueError, TypeError):
                break
            offset += _HEADER.size + length
            if report is not None:
                report.records += 1
            yield delivery
        if report is not None:
            report.torn_tail_bytes = size - offset


class Spool:
    """The spool directory of one process. Every method blocks: call them from a thread."""

    def __init__(self, directory: str | Path, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"SPOOL_DIR {self.directory} cannot be created ({exc.strerror}).") from None
        if not os.access(self.directory, os.W_OK):
            raise ConfigurationError(f"SPOOL_DIR {self.directory} is not writable.")
        self._path = self.directory / f"spool-{socket.gethostname()}-{os.getpid()}.log"
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self._pending_bytes = 0
        self.pending()  # count what earlier processes left behind

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting to be drained, as this process counts them."""
        return self._pending_bytes

    def append(self, delivery: SpooledDelivery) -> None:
        """Write one record and fsync it; when this returns, the delivery survives a crash.

        Raises :class:`SpoolFull` (writing nothing) when the record would take the spool past
        ``max_bytes``, and another ``OSError`` when the disk refuses; a record that could not be
        written whole is cut off again, so it never hides the records appended after it.
        """
        record = encode_record(delivery)
        with self._lock:
            if self.max_bytes is not None and self._pending_bytes + len(record) > self.max_bytes:
                raise SpoolFull(errno.ENOSPC, f"The spool holds {self._pending_bytes} bytes of its {self.max_bytes}.")
            fd = self._open_for_append()
            try:
                start = os.fstat(fd).st_size
                try:
                    if os.write(fd, record) != len(record):
                        raise OSError(errno.EIO, "The spool record was written only in part.")
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
            self._pending_bytes += len(record)
            self._sync_directory()

    def _open_for_append(self) -> int:
        """This process's spool file, opened and locked, and still the file under its name (a drainer
        in another process may have renamed it between the open and the lock)."""
        while True:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(self._path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def pending(self) -> list[Path]:
        """Spool files waiting to be drained (this process's and any left by others); also recounts
        :attr:`pending_bytes` from them."""
        with self._lock:
            found = [*self.directory.glob("spool-*.log"), *self.directory.glob("spool-*.draining")]
            files: list[Path] = []
            total = 0
            for path in sorted(found):
                try:
                    status = path.stat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(status.st_mode):
                    files.append(path)
                    total += status.st_size
            self._pending_bytes = total
        return files

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
        self._forget(path, lambda: path.unlink(missing_ok=True))

    def set_aside(self, path: Path) -> Path:
        """Rename a file that ended in a torn record to ``*.torn``: kept for inspection, no longer pending."""
        kept = path.with_name(path.name.replace(".draining", ".torn"))
        self._forget(path, lambda: path.replace(kept))
        return kept

    def _forget(self, path: Path, remove: Callable[[], object]) -> None:
        with self._lock:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            remove()
            self._pending_bytes = max(0, self._pending_bytes - size)
            self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
