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
from typing import Any, Literal

from cli.operations import open_command_redis, progress_line, redis_errors
from core.config import Settings
from core.errors import (
    InvalidPayload,
    LinkConflict,
    PermanentError,
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
BAR_WIDTH = 30

Outcome = Literal["matched", "already_linked", "unmatched", "conflict", "failed"]
SECTIONS: tuple[tuple[Outcome, str], ...] = (
    ("conflict", "Conflicts (nothing was written for these; resolve by hand, e.g. `users link`):"),
    ("unmatched", "Unmatched (no internal vehicle found):"),
    ("failed", "Failed (Smartcar did not answer; rerun to retry):"),
)


class Backfill:
    """One run over ``smartcar``'s connections into ``users``, and what it found so far;
    ``smartcar_user_id`` limits it to one Smartcar user (``filter[userId]``, checked again on every
    item). Bad credentials and database errors propagate: they would fail every connection alike."""

    def __init__(
        self,
        smartcar: SmartcarClient,
        users: UserStore,
        dry_run: bool,
        smartcar_user_id: str | None,
        progress: Callable[[Backfill], None],
    ) -> None:
        self._smartcar = smartcar
        self._users = users
        self.dry_run = dry_run
        self._only_user = smartcar_user_id
        self._progress = progress
        self.findings: list[tuple[Outcome, str]] = []  # each connection's outcome and a line about it
        self.counts: Counter[Outcome] = Counter()
        self.total: int | None = None  # meta.totalCount of the listing
        self.ignored = 0  # items of other users, returned despite filter[userId]
        self.aborted: str | None = None  # why the listing itself broke off
        # What this run stored or, in a dry run, planned: decisions read the database through
        # these, so a dry run plans exactly what a real run would do, conflicts included.
        self._user_links: dict[int, str] = {}
        self._owners: dict[str, int] = {}
        self._vehicle_links: dict[int, str] = {}
        self._linked_vehicles: dict[str, list[VehicleRecord]] = {}
        self._vins: dict[str, tuple[str | None, str]] = {}

    async def run(self) -> None:
        """Decide every connection; a failure of the listing itself ends the run with ``aborted``."""
        try:
            async for items, total in connection_pages(self._smartcar, self._only_user, MAX_PAGES, PAGE_SIZE):
                self.total = self.total if total is None else total
                for item in items:
                    sc_user, sc_vehicle = connection_ids(item)
                    if sc_user is None or sc_vehicle is None:
                        continue
                    if self._only_user is not None and sc_user != self._only_user:
                        self.ignored += 1
                        continue
                    try:
                        outcome, detail = await self._decide(sc_user, sc_vehicle)
                    except (SmartcarUnavailable, SmartcarRateLimited) as exc:
                        # One vehicle's OEM being down must not stop the others; the database being
                        # down (also transient) would fail them all, so that one ends the run instead.
                        outcome, detail = "failed", f"{exc.message} Rerun to retry it."
                    self.findings.append(
                        (outcome, f"Smartcar vehicle {sc_vehicle} of Smartcar user {sc_user}: {detail}")
                    )
                    self.counts[outcome] += 1
                    self._progress(self)
        except TransientError as exc:
            self.aborted = exc.message

    async def _decide(self, sc_user: str, sc_vehicle: str) -> tuple[Outcome, str]:
        candidates = await self._known(sc_vehicle)
        how = "its Smartcar id"
        if not candidates:
            vin, why = await self._vin(sc_user, sc_vehicle)
            if vin is None:
                return "unmatched", f"{why}."
            by_vin = await asyncio.to_thread(self._users.find_vehicles_by_vin, vin)
            if not by_vin:
                return "unmatched", f"no internal vehicle has VIN {vin}."
            candidates = [v for v in by_vin if self._vehicle_id(v) in (None, sc_vehicle)]
            if not candidates:
                taken = ", ".join(f"vehicle {v.id} ({self._vehicle_id(v)})" for v in by_vin)
                return "conflict", f"VIN {vin} belongs to {taken}, already linked to another Smartcar vehicle."
            how = f"VIN {vin}"

        mine = [v for v in candidates if self._owner_id(v) == sc_user]
        free = [v for v in candidates if v.user_id is not None and self._owner_id(v) is None]
        chosen = mine or free
        if not chosen:
            owners = "; ".join(_owner_text(v, self._owner_id(v)) for v in candidates)
            return "conflict", f"found by {how}, but {owners}; nothing was changed."
        if len(chosen) > 1:
            ids = ", ".join(str(v.id) for v in chosen)
            return "conflict", f"vehicles {ids} all match by {how}; link the right one with `users link`."
        vehicle = chosen[0]
        assert vehicle.user_id is not None
        if self._owner_id(vehicle) is None:
            holder = await self._holder(sc_user)
            if holder is not None and holder != vehicle.user_id:
                return "conflict", (
                    f"Smartcar user {sc_user} already belongs to user {holder}, but vehicle {vehicle.id} "
                    f"(found by {how}) belongs to user {vehicle.user_id}; nothing was changed."
                )
        steps = []
        if self._vehicle_id(vehicle) is None:
            steps.append(f"vehicle {vehicle.id} → Smartcar vehicle {sc_vehicle}")
        if self._owner_id(vehicle) is None:
            steps.append(f"user {vehicle.user_id} → Smartcar user {sc_user}")
        if not steps:
            return "already_linked", f"vehicle {vehicle.id} already linked."
        if not self.dry_run:
            try:
                await asyncio.to_thread(self._users.link_vehicle, vehicle.id, sc_vehicle, sc_user)
            except LinkConflict as exc:
                # Something changed between the decision and the write (another run, `users link`).
                return "conflict", exc.message
        self._vehicle_links[vehicle.id] = sc_vehicle
        self._user_links[vehicle.user_id] = sc_user
        self._owners[sc_user] = vehicle.user_id
        self._linked_vehicles.setdefault(sc_vehicle, []).append(vehicle)
        return "matched", f"{'would link' if self.dry_run else 'linked'} {'; '.join(steps)} (by {how})."

    async def _known(self, sc_vehicle: str) -> list[VehicleRecord]:
        stored = await asyncio.to_thread(self._users.find_vehicles_by_smartcar_id, sc_vehicle)
        ids = {v.id for v in stored}
        return stored + [v for v in self._linked_vehicles.get(sc_vehicle, ()) if v.id not in ids]

    async def _vin(self, sc_user: str, sc_vehicle: str) -> tuple[str | None, str]:
        """The vehicle's VIN, or ``None`` with the reason it could not be read (cached per vehicle)."""
        if sc_vehicle not in self._vins:
            try:
                resource = await self._smartcar.get_signal(sc_vehicle, sc_user, VIN_SIGNAL)
            except (SmartcarRejected, InvalidPayload) as exc:
                # InvalidPayload: Smartcar listed a vehicle id that is not safe to put in a URL path.
                self._vins[sc_vehicle] = (None, f"the VIN could not be read ({exc.message.rstrip('.')})")
            else:
                vin = _vin_value(resource)
                self._vins[sc_vehicle] = (vin, "" if vin else "the VIN signal has no usable value")
        return self._vins[sc_vehicle]

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

    def summary(self) -> str:
        """``matched 3, already linked 1, unmatched 2, conflicts 1 (7 connections)``, plus failures."""
        counts = self.counts
        parts = [
            f"{'would match' if self.dry_run else 'matched'} {counts['matched']}",
            f"already linked {counts['already_linked']}",
            f"unmatched {counts['unmatched']}",
            f"conflicts {counts['conflict']}",
        ]
        if counts["failed"]:
            parts.append(f"failed {counts['failed']}")
        seen = len(self.findings)
        text = f"{', '.join(parts)} ({seen} connection{'s' if seen != 1 else ''}"
        if self.ignored:
            text += f"; {self.ignored} of other users ignored"
        return text + ")"

    def progress_bar(self) -> str:
        done = len(self.findings) + self.ignored
        if self.total:
            filled = min(BAR_WIDTH, BAR_WIDTH * done // self.total)
            line = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{self.total} connections"
        else:
            line = f"{done} connections"
        return f"{line}, {self.counts['matched']} matched, {self.counts['conflict']} conflicts "


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


def run_backfill(settings: Settings, dry_run: bool, smartcar_user_id: str | None) -> int:
    settings.require_client_credentials()

    async def run(progress: Callable[[Backfill], None]) -> Backfill:
        # The application token is cached in Redis, shared with the workers.
        redis = open_command_redis(command_redis_async, settings)
        # A handful of connections: the run is sequential, and Smartcar's application rate limit
        # is the bottleneck, not the pool.
        http = LeanHttp(max_connections=4)
        users = UserStore(settings.database_url)
        try:
            backfill = Backfill(smartcar_client(settings, redis, http), users, dry_run, smartcar_user_id, progress)
            await backfill.run()
            return backfill
        finally:
            await redis.aclose()
            await http.aclose()
            await asyncio.to_thread(users.dispose)

    with progress_line(sys.stderr, Backfill.progress_bar) as show, redis_errors():
        report = asyncio.run(run(show))
    sections = SECTIONS
    if dry_run:
        print("Dry run: nothing was written.")
        sections = (("matched", "Planned:"), *sections)
    for outcome, title in sections:
        lines = [f"  {line}" for kind, line in report.findings if kind == outcome]
        if lines:
            print(title, *lines, sep="\n")
    print(report.summary())
    if report.aborted is not None:
        raise PermanentError(f"stopped early: {report.aborted} Rerun to continue; what was stored is kept.")
    if report.counts["matched"] and dry_run:
        print("Run `smartcar-ingest backfill` without --dry-run to store these links.")
    elif report.counts["matched"]:
        print(
            "Events parked while these users were unknown can now be delivered: "
            "smartcar-ingest replay --reason unknown_user"
        )
    return 1 if report.counts["failed"] else 0
