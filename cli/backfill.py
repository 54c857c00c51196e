"""``smartcar-ingest backfill``: Smartcar user and vehicle ids for connections made before ``user_id``
was captured. :class:`Backfill` matches each item of ``GET /v3/connections`` to an internal vehicle
(by stored Smartcar id, else by VIN) and stores both ids, ending each connection in one
:data:`Outcome`. The outcomes, idempotence, dry runs and exit status: docs/migration.md, "Step 3".
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from cli.operations import open_command_redis, progress_line, redis_errors
from core.config import Settings
from core.errors import (
    InvalidPayload,
    LinkConflict,
    SmartcarRateLimited,
    SmartcarRejected,
    SmartcarUnavailable,
    TransientError,
)
from core.redis.clients import command_redis_async
from core.smartcar.client import SmartcarClient, smartcar_client
from core.smartcar.http import LeanHttp
from core.store.users import UserStore, VehicleRecord
from service.connect import PAGE_SIZE, connection_ids, connection_pages

VIN_SIGNAL = "vehicleidentification-vin"
#: Pages followed at most, so a listing that never ends cannot loop forever (a million connections).
MAX_PAGES = 10_000

Outcome = Literal["matched", "already_linked", "unmatched", "conflict", "failed"]


@dataclass(frozen=True, slots=True)
class SmartcarConnection:
    """One item of ``GET /v3/connections``: a Smartcar user and a vehicle they connected."""

    smartcar_user_id: str
    smartcar_vehicle_id: str

    def __str__(self) -> str:
        return f"Smartcar vehicle {self.smartcar_vehicle_id} of Smartcar user {self.smartcar_user_id}"


@dataclass(frozen=True, slots=True)
class Finding:
    """What happened to one connection; ``detail`` is one line for people, printed after the connection."""

    outcome: Outcome
    connection: SmartcarConnection
    detail: str


@dataclass(slots=True)
class BackfillReport:
    """The run so far: every finding, and what Smartcar said the total is."""

    dry_run: bool
    findings: list[Finding] = field(default_factory=list)
    total: int | None = None  # meta.totalCount of the listing
    ignored: int = 0  # items of other users, returned despite filter[userId]
    aborted: str | None = None  # why the listing itself broke off
    counts: Counter[Outcome] = field(default_factory=Counter)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)
        self.counts[finding.outcome] += 1

    def summary(self) -> str:
        """``matched 3, already linked 1, unmatched 2, conflicts 1 (7 connections)``, plus failures."""
        verb = "would match" if self.dry_run else "matched"
        parts = [
            f"{verb} {self.counts['matched']}",
            f"already linked {self.counts['already_linked']}",
            f"unmatched {self.counts['unmatched']}",
            f"conflicts {self.counts['conflict']}",
        ]
        if self.counts["failed"]:
            parts.append(f"failed {self.counts['failed']}")
        seen = len(self.findings)
        text = f"{', '.join(parts)} ({seen} connection{'s' if seen != 1 else ''}"
        if self.ignored:
            text += f"; {self.ignored} of other users ignored"
        return text + ")"


class Backfill:
    """One run over ``smartcar``'s connections into ``users``; ``smartcar_user_id`` limits it to one
    Smartcar user (``filter[userId]``, checked again on every item). Bad credentials and database
    errors propagate: they would fail every connection alike."""

    def __init__(
        self,
        smartcar: SmartcarClient,
        users: UserStore,
        *,
        dry_run: bool = False,
        smartcar_user_id: str | None = None,
        page_size: int = PAGE_SIZE,
        progress: Callable[[BackfillReport], None] | None = None,
    ) -> None:
        self._smartcar = smartcar
        self._users = users
        self._dry_run = dry_run
        self._only_user = smartcar_user_id
        self._page_size = page_size
        self._progress = progress
        self.report = BackfillReport(dry_run=dry_run)
        # What this run stored or, in a dry run, planned: decisions read the database through
        # these, so a dry run plans exactly what a real run would do, conflicts included.
        self._user_links: dict[int, str] = {}
        self._owners: dict[str, int] = {}
        self._vehicle_links: dict[int, str] = {}
        self._linked_vehicles: dict[str, list[VehicleRecord]] = {}
        self._vins: dict[str, tuple[str | None, str]] = {}

    async def run(self) -> BackfillReport:
        """Process every connection; a failure of the listing itself ends the run with ``aborted``."""
        pages = connection_pages(self._smartcar, self._only_user, MAX_PAGES, self._page_size)
        try:
            async for items, total in pages:
                self.report.total = self.report.total if total is None else total
                for item in items:
                    sc_user, sc_vehicle = connection_ids(item)
                    if sc_user is None or sc_vehicle is None:
                        continue
                    if self._only_user is not None and sc_user != self._only_user:
                        self.report.ignored += 1
                        continue
                    connection = SmartcarConnection(sc_user, sc_vehicle)
                    try:
                        finding = await self._decide(connection)
                    except (SmartcarUnavailable, SmartcarRateLimited) as exc:
                        # One vehicle's OEM being down must not stop the others; the database being
                        # down (also transient) would fail them all, so that one ends the run instead.
                        finding = Finding("failed", connection, f"{exc.message} Rerun to retry it.")
                    self.report.add(finding)
                    if self._progress is not None:
                        self._progress(self.report)
        except TransientError as exc:
            self.report.aborted = exc.message
        return self.report

    async def _decide(self, connection: SmartcarConnection) -> Finding:
        sc_user, sc_vehicle = connection.smartcar_user_id, connection.smartcar_vehicle_id
        candidates = await self._known(sc_vehicle)
        how = "its Smartcar id"
        if not candidates:
            vin, why = await self._vin(connection)
            if vin is None:
                return Finding("unmatched", connection, f"{why}.")
            by_vin = await asyncio.to_thread(self._users.find_vehicles_by_vin, vin)
            if not by_vin:
                return Finding("unmatched", connection, f"no internal vehicle has VIN {vin}.")
            candidates = [v for v in by_vin if self._vehicle_id(v) in (None, sc_vehicle)]
            if not candidates:
                taken = ", ".join(f"vehicle {v.id} ({self._vehicle_id(v)})" for v in by_vin)
                why = f"VIN {vin} belongs to {taken}, already linked to another Smartcar vehicle."
                return Finding("conflict", connection, why)
            how = f"VIN {vin}"

        mine = [v for v in candidates if self._owner_id(v) == sc_user]
        free = [v for v in candidates if v.user_id is not None and self._owner_id(v) is None]
        chosen = mine or free
        if not chosen:
            owners = "; ".join(_owner_text(v, self._owner_id(v)) for v in candidates)
            return Finding("conflict", connection, f"found by {how}, but {owners}; nothing was changed.")
        if len(chosen) > 1:
            ids = ", ".join(str(v.id) for v in chosen)
            why = f"vehicles {ids} all match by {how}; link the right one with `users link`."
            return Finding("conflict", connection, why)
        vehicle = chosen[0]
        assert vehicle.user_id is not None
        if self._owner_id(vehicle) is None:
            holder = await self._holder(sc_user)
            if holder is not None and holder != vehicle.user_id:
                why = (
                    f"Smartcar user {sc_user} already belongs to user {holder}, but vehicle {vehicle.id} "
                    f"(found by {how}) belongs to user {vehicle.user_id}; nothing was changed."
                )
                return Finding("conflict", connection, why)
        steps = []
        if self._vehicle_id(vehicle) is None:
            steps.append(f"vehicle {vehicle.id} → Smartcar vehicle {sc_vehicle}")
        if self._owner_id(vehicle) is None:
            steps.append(f"user {vehicle.user_id} → Smartcar user {sc_user}")
        if not steps:
            return Finding("already_linked", connection, f"vehicle {vehicle.id} already linked.")
        if not self._dry_run:
            try:
                await asyncio.to_thread(self._users.link_vehicle, vehicle.id, sc_vehicle, sc_user)
            except LinkConflict as exc:
                # Something changed between the decision and the write (another run, `users link`).
                return Finding("conflict", connection, exc.message)
        self._remember(vehicle, sc_vehicle, sc_user)
        verb = "would link" if self._dry_run else "linked"
        return Finding("matched", connection, f"{verb} {'; '.join(steps)} (by {how}).")

    async def _known(self, sc_vehicle: str) -> list[VehicleRecord]:
        stored = await asyncio.to_thread(self._users.find_vehicles_by_smartcar_id, sc_vehicle)
        ids = {v.id for v in stored}
        return stored + [v for v in self._linked_vehicles.get(sc_vehicle, ()) if v.id not in ids]

    async def _vin(self, connection: SmartcarConnection) -> tuple[str | None, str]:
        """The vehicle's VIN, or ``None`` with the reason it could not be read (cached per vehicle)."""
        key = connection.smartcar_vehicle_id
        if key not in self._vins:
            try:
                resource = await self._smartcar.get_signal(key, connection.smartcar_user_id, VIN_SIGNAL)
            except (SmartcarRejected, InvalidPayload) as exc:
                # InvalidPayload: Smartcar listed a vehicle id that is not safe to put in a URL path.
                self._vins[key] = (None, f"the VIN could not be read ({exc.message.rstrip('.')})")
            else:
                vin = _vin_value(resource)
                self._vins[key] = (vin, "" if vin else "the VIN signal has no usable value")
        return self._vins[key]

    async def _holder(self, sc_user: str) -> int | None:
        if sc_user in self._owners:
            return self._owners[sc_user]
        user = await asyncio.to_thread(self._users.find_by_smartcar_user_id, sc_user)
        return None if user is None else user.id

    def _vehicle_id(self, vehicle: VehicleRecord) -> str | None:
        return vehicle.smartcar_vehicle_id or self._vehicle_links.get(vehicle.id)

    def _owner_id(self, vehicle: VehicleRecord) -> str | None:
        if vehicle.owner_smartcar_user_id is not None or vehicle.user_id is None:
            return vehicle.owner_smartcar_user_id
        return self._user_links.get(vehicle.user_id)

    def _remember(self, vehicle: VehicleRecord, sc_vehicle: str, sc_user: str) -> None:
        assert vehicle.user_id is not None
        self._vehicle_links[vehicle.id] = sc_vehicle
        self._user_links[vehicle.user_id] = sc_user
        self._owners[sc_user] = vehicle.user_id
        self._linked_vehicles.setdefault(sc_vehicle, []).append(vehicle)


def _vin_value(resource: dict[str, Any]) -> str | None:
    """The VIN of a signal resource (``attributes.body.value``), upper-cased; ``None`` if unusable."""
    attributes = resource.get("attributes")
    if not isinstance(attributes, dict):
        return None
    status = attributes.get("status")
    if isinstance(status, dict) and status.get("value") not in (None, "SUCCESS"):
        return None
    body = attributes.get("body")
    value = body.get("value") if isinstance(body, dict) else None
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > 17:
        return None
    return value.strip().upper()


def _owner_text(vehicle: VehicleRecord, owner_smartcar_id: str | None) -> str:
    if vehicle.user_id is None:
        return f"vehicle {vehicle.id} has no owner"
    return f"vehicle {vehicle.id} belongs to user {vehicle.user_id}, linked to Smartcar user {owner_smartcar_id}"


_BAR_WIDTH = 30
_SECTIONS: tuple[tuple[Outcome, str], ...] = (
    ("conflict", "Conflicts (nothing was written for these; resolve by hand, e.g. `users link`):"),
    ("unmatched", "Unmatched (no internal vehicle found):"),
    ("failed", "Failed (Smartcar did not answer; rerun to retry):"),
)


def run_backfill(
    settings: Settings,
    *,
    dry_run: bool,
    smartcar_user_id: str | None = None,
    page_size: int = PAGE_SIZE,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the backfill with the configured credentials and print the plan or the outcome."""
    out = out or sys.stdout
    err = err or sys.stderr
    settings.require_client_credentials()

    async def run(show: Callable[[str], None]) -> BackfillReport:
        # The application token is cached in Redis, shared with the workers.
        redis = open_command_redis(command_redis_async, settings)
        # A handful of connections: the run is sequential, and Smartcar's application rate limit
        # is the bottleneck, not the pool.
        http = LeanHttp(max_connections=4)
        users = UserStore(settings.database_url)
        try:
            backfill = Backfill(
                smartcar_client(settings, redis, http),
                users,
                dry_run=dry_run,
                smartcar_user_id=smartcar_user_id,
                page_size=page_size,
                progress=lambda report: show(_progress(report)),
            )
            return await backfill.run()
        finally:
            await redis.aclose()
            await http.aclose()
            await asyncio.to_thread(users.dispose)

    with progress_line(err) as show, redis_errors():
        report = asyncio.run(run(show))
    return _print_report(report, out, err)


def _progress(report: BackfillReport) -> str:
    done = len(report.findings) + report.ignored
    if report.total:
        filled = min(_BAR_WIDTH, _BAR_WIDTH * done // report.total)
        line = f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {done}/{report.total} connections"
    else:
        line = f"{done} connections"
    return f"{line}, {report.counts['matched']} matched, {report.counts['conflict']} conflicts "


def _print_report(report: BackfillReport, out: TextIO, err: TextIO) -> int:
    sections = _SECTIONS
    if report.dry_run:
        print("Dry run: nothing was written.", file=out)
        sections = (("matched", "Planned:"), *sections)
    for outcome, title in sections:
        details = [f"  {f.connection}: {f.detail}" for f in report.findings if f.outcome == outcome]
        if details:
            print(title, *details, sep="\n", file=out)
    print(report.summary(), file=out)
    if report.aborted is not None:
        print(
            f"smartcar-ingest backfill: stopped early: {report.aborted} Rerun to continue; what was stored is kept.",
            file=err,
        )
        return 1
    if report.counts["matched"]:
        if report.dry_run:
            print("Run `smartcar-ingest backfill` without --dry-run to store these links.", file=out)
        else:
            print(
                "Events parked while these users were unknown can now be delivered: "
                "smartcar-ingest replay --reason unknown_user",
                file=out,
            )
    return 1 if report.counts["failed"] else 0
