"""The spool: verified deliveries kept on local disk (``SPOOL_DIR``) while Redis cannot take them,
and the drainer that moves them into Redis, through the live dedupe, once it answers. Record format,
file life cycle, size bound: docs/reliability.md, "Spool file safety"; docs/security.md."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import json
import os
import socket
import stat
import struct
import threading
import time
import zlib
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ConfigDict, TypeAdapter, with_config
from redis.exceptions import RedisError

from core import metrics
from core.errors import ConfigurationError
from core.logs import get_logger
from core.redis.inbox import Inbox

log = get_logger("smartcar_ingest.spool")

MAGIC = b"SCI1"
_HEADER = struct.Struct(">4sII")


# Read back strictly: a record whose checksum holds but whose fields do not (another version's, one
# written by hand) is corrupt, and ends the read like a failed checksum.
@with_config(ConfigDict(strict=True, extra="forbid"))
@dataclass(frozen=True)
class SpooledDelivery:  # enough to enqueue it, or to park it (park_reason set), later
    event_id: str | None
    event_type: str
    body: str
    received_at_ms: int
    park_reason: str | None = None
    park_detail: str | None = None


@dataclass
class DrainReport:
    files: int = 0
    accepted: int = 0
    duplicates: int = 0
    parked: int = 0
    torn_tail_bytes: int = 0
    failed_files: int = 0


_RECORD = TypeAdapter(SpooledDelivery)


def encode_record(delivery: SpooledDelivery) -> bytes:
    payload = json.dumps(delivery.__dict__, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(path: Path, report: DrainReport | None = None) -> Generator[SpooledDelivery, None, None]:
    """The whole records of a spool file, in order, up to a torn or corrupt one; once exhausted,
    the bytes left unread are added to ``report.torn_tail_bytes``."""
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
                delivery = _RECORD.validate_json(payload)
            except ValueError:  # a ValidationError
                break
            offset += _HEADER.size + length
            yield delivery
        if report is not None:
            report.torn_tail_bytes += size - offset


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
        #: The files the last drain pass could not drain, by the name the next pass finds them under,
        #: with the error each failed with (logged when it first fails, or fails differently).
        self.failing: dict[str, str] = {}
        self.pending()  # count what earlier processes left behind

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting to be drained, as this process counts them (exported as ``smartcar_ingest_spool_bytes``)."""
        return self._pending_bytes

    @pending_bytes.setter
    def pending_bytes(self, value: int) -> None:
        self._pending_bytes = value
        metrics.SPOOL_BYTES.set(value)

    def append(self, delivery: SpooledDelivery) -> None:
        """Write one record and fsync it: on return the delivery survives a crash. A record not
        written whole is cut off again, so it never hides the ones appended after it."""
        record = encode_record(delivery)
        with self._lock:
            if self.max_bytes is not None and self.pending_bytes + len(record) > self.max_bytes:
                raise OSError(errno.ENOSPC, f"The spool holds {self.pending_bytes} bytes of its {self.max_bytes}.")
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
            self.pending_bytes += len(record)
            self._sync_directory()

    def _open_for_append(self) -> int:
        """This process's spool file, locked, and still under its name (a drainer may rename it)."""
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
        """Spool files waiting to be drained (any process's); recounts :attr:`pending_bytes`."""
        with self._lock:
            found = [*self.directory.glob("spool-*.log"), *self.directory.glob("spool-*.draining")]
            files: list[Path] = []
            total = 0
            for path in sorted(found):
                try:  # the entry itself, never what a link points at: the spool writes no links
                    status = path.lstat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(status.st_mode):
                    files.append(path)
                    total += status.st_size
            self.pending_bytes = total
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

    def retire(self, path: Path, torn_bytes: int) -> None:
        """Delete a drained file, or keep one that ended in a torn record as ``*.torn`` for inspection."""
        if torn_bytes:
            kept = path.replace(path.with_name(path.name.replace(".draining", ".torn")))
            log.error("spool file ended in a torn record; it was not applied", file=str(kept), bytes=torn_bytes)
        else:
            path.unlink(missing_ok=True)
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: What pauses a pass from within a file: Redis not answering (a ``TimeoutError`` is Redis's deadline
#: passing; Python counts it an ``OSError``). Any other error, the file's own ``OSError`` included,
#: fails that file alone.
REDIS_UNAVAILABLE = (RedisError, TimeoutError)
#: Deliveries enqueued together while draining (they share round trips through the group commit).
CHUNK = 256


async def drain_once(spool: Spool, inbox: Inbox) -> DrainReport:
    """Drain every pending spool file; raises ``RedisError`` (leaving the file) if Redis fails. A
    file that fails otherwise (one the disk refuses, or a fault of ours) is left for the next pass,
    and the others drain. A file's failure is logged once, not every pass: the gauge
    ``smartcar_ingest_spool_failed_files`` counts the files kept so."""
    report = DrainReport()
    earlier, spool.failing = spool.failing, {}
    try:
        for path in await asyncio.to_thread(spool.pending):
            listed = path.name
            try:
                claimed = await asyncio.to_thread(spool.claim, path)
                if claimed is None:
                    continue
                path = claimed
                await _drain_file(spool, inbox, claimed, report)
            except REDIS_UNAVAILABLE:
                raise
            except Exception as exc:  # its records stay, applied again next pass through the dedupe
                error = spool.failing[path.name] = _describe(exc)
                if earlier.get(path.name) != error:
                    log.error(
                        "spool file not drained; it is kept and tried again each second", file=path.name, error=error
                    )
                continue
            if listed in earlier or path.name in earlier:
                log.info("spool file drained after failing earlier", file=path.name)
            report.files += 1
    except BaseException:  # Redis, or the listing: the files not reached keep their standing
        spool.failing = earlier | spool.failing
        raise
    finally:
        metrics.SPOOL_FAILED_FILES.set(len(spool.failing))
    report.failed_files = len(spool.failing)  # this pass's: the failures of earlier ones were cleared
    if report.files:
        await asyncio.to_thread(spool.pending)  # recount the spool's size, for SPOOL_MAX_BYTES
        log.info("spool drained", **asdict(report))
    return report


def _describe(exc: BaseException) -> str:
    """The error's type, with the OS's words for one of the disk's (never a path or a body)."""
    reason = exc.strerror if isinstance(exc, OSError) else None
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


async def _drain_file(spool: Spool, inbox: Inbox, claimed: Path, report: DrainReport) -> None:
    torn = report.torn_tail_bytes
    records = read_records(claimed, report)
    try:
        while chunk := await asyncio.to_thread(list, itertools.islice(records, CHUNK)):
            parks = [d for d in chunk if d.park_reason]
            accepts = [d for d in chunk if not d.park_reason]
            # Every accept of the chunk ends before a failure is raised: none is left running unawaited.
            answers = await asyncio.gather(
                *(inbox.accept(str(d.event_id), d.event_type, d.body, d.received_at_ms) for d in accepts),
                return_exceptions=True,
            )
            results = [answer for answer in answers if isinstance(answer, bool)]
            report.accepted += sum(results)
            report.duplicates += len(results) - sum(results)
            failure = next((answer for answer in answers if isinstance(answer, BaseException)), None)
            if failure is not None:
                raise failure
            for d in parks:
                await inbox.parked.park(d.event_id, str(d.park_reason), d.park_detail or "", d.body)
                report.parked += 1
    finally:
        records.close()
    # Everything before a tear was applied; the torn bytes are kept for inspection.
    await asyncio.to_thread(spool.retire, claimed, report.torn_tail_bytes - torn)


async def drain_forever(spool: Spool, inbox: Inbox) -> None:
    """Drain, once a second, whatever there is to drain; runs until cancelled."""
    while True:
        try:
            await drain_once(spool, inbox)  # its listing also recounts the spool's size
        except REDIS_UNAVAILABLE as exc:
            log.warning("spool drain paused: Redis not available yet", error=type(exc).__name__)
        except OSError as exc:  # the listing: the spool directory itself
            log.error("spool drain paused: the spool directory cannot be listed", error=_describe(exc))
        except Exception as exc:  # a fault of ours must not end the only task that drains the spool
            log.error("spool drain failed; it is tried again in a second", error=type(exc).__name__)
        await asyncio.sleep(1)
