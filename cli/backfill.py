"""``smartcar-ingest backfill``: the Smartcar ids of connections made before ``user_id`` was captured,
matched by stored Smartcar id, else by VIN (docs/migration.md, "Step 3")."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

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
from core.smartcar.connections import PAGE_SIZE, connection_ids, connection_pages, dig
from core.smartcar.http import LeanHttp
from core.store.users import UserStore, VehicleRecord

VIN_SIGNAL = "vehicleidentification-vin"
#: Pages followed at most, so a listing that never ends cannot loop forever (a million connections).
MAX_PAGES = 10_000
BAR_WIDTH = 30

Outcome = Literal["matched", "already_linked", "unmatched", "conflict", "failed"]
SECTIONS: tuple[tuple[Outcome, str], ...] = (
    ("matched", "Planned:"),  # dry runs only
    ("conflict", "Conflicts (nothing was written for these; resolve by hand, e.g. `users link`):"),
    ("unmatched", "Unmatched (no internal vehicle found):"),
    ("failed", "Failed (Smartcar did not answer; rerun to retry):"),
)


@dataclass
class Backfill:
    """One run over ``smartcar``'s connections (``only_user``'s alone) into ``users``; bad credentials and
    database errors propagate: they would fail every connection alike."""

    smartcar: SmartcarClient
    users: UserStore
    dry_run: bool
    only_user: str | None
    findings: dict[Outcome, list[str]] = field(default_factory=lambda: {kind: [] for kind in get_args(Outcome)})
    total: int | None = None  # meta.totalCount of the listing
    ignored: int = 0  # items of other users, returned despite filter[userId]
    aborted: str | None = None  # why the listing itself broke off
    # What this run stored or, dry, planned: a dry run plans exactly what a real run would do.
    _user_links: dict[int, str] = field(default_factory=dict, init=False)
    _owners: dict[str, int] = field(default_factory=dict, init=False)
    _vehicle_links: dict[int, str] = field(default_factory=dict, init=False)
    _linked_vehicles: dict[str, list[VehicleRecord]] = field(default_factory=dict, init=False)
    # Each vehicle's VIN read once a run (a shared car is listed once per user): Smartcar's rate limit is the bound.
    _vins: dict[str, tuple[str | None, str]] = field(default_factory=dict, init=False)

    async def run(self, progress: Callable[[Backfill], None]) -> None:
        """Decide every connection; a failure of the listing itself ends the run with ``aborted``."""
        try:
            async for items, total in connection_pages(self.smartcar, self.only_user, MAX_PAGES, PAGE_SIZE):
                self.total = self.total if total is None else total
                for item in items:
                    sc_user, sc_vehicle = connection_ids(item)
                    if sc_user is None or sc_vehicle is None:
                        continue
                    if self.only_user is not None and sc_user != self.only_user:
                        self.ignored += 1
                        continue
                    try:
                        outcome, detail = await self._decide(sc_user, sc_vehicle)
                    except (SmartcarUnavailable, SmartcarRateLimited) as exc:
                        # One OEM down must not stop the others (the database down ends the run instead).
                        outcome, detail = "failed", f"{exc.message} Rerun to retry it."
                    self.findings[outcome].append(f"Smartcar vehicle {sc_vehicle} of Smartcar user {sc_user}: {detail}")
                    progress(self)
        except TransientError as exc:
            self.aborted = exc.message

    async def _decide(self, sc_user: str, sc_vehicle: str) -> tuple[Outcome, str]:
        stored = await asyncio.to_thread(self.users.find_vehicles_by_smartcar_id, sc_vehicle)
        known = {v.id for v in stored}
        candidates = stored + [v for v in self._linked_vehicles.get(sc_vehicle, ()) if v.id not in known]
        how = "its Smartcar id"
        if not candidates:
            vin, why = await self._vin(sc_user, sc_vehicle)
            if vin is None:
                return "unmatched", f"{why}."
            by_vin = await asyncio.to_thread(self.users.find_vehicles_by_vin, vin)
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
            owners = "; ".join(
                f"vehicle {v.id} has no owner"
                if v.user_id is None
                else f"vehicle {v.id} belongs to user {v.user_id}, linked to Smartcar user {self._owner_id(v)}"
                for v in candidates
            )
            return "conflict", f"found by {how}, but {owners}; nothing was changed."
        if len(chosen) > 1:
            ids = ", ".join(str(v.id) for v in chosen)
            return "conflict", f"vehicles {ids} all match by {how}; link the right one with `users link`."
        vehicle = chosen[0]
        assert vehicle.user_id is not None
        if self._owner_id(vehicle) is None:
            holder = self._owners.get(sc_user)
            if holder is None:
                user = await asyncio.to_thread(self.users.find_by_smartcar_user_id, sc_user)
                holder = None if user is None else user.id
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
                await asyncio.to_thread(self.users.link_vehicle, vehicle.id, sc_vehicle, sc_user)
            except LinkConflict as exc:
                # Something changed between the decision and the write (another run, `users link`).
                return "conflict", exc.message
        self._vehicle_links[vehicle.id] = sc_vehicle
        self._user_links[vehicle.user_id] = sc_user
        self._owners[sc_user] = vehicle.user_id
        self._linked_vehicles.setdefault(sc_vehicle, []).append(vehicle)
        return "matched", f"{'would link' if self.dry_run else 'linked'} {'; '.join(steps)} (by {how})."

    async def _vin(self, sc_user: str, sc_vehicle: str) -> tuple[str | None, str]:
        """The vehicle's VIN, or ``None`` with the reason it could not be read (read once a run)."""
        if sc_vehicle not in self._vins:
            try:
                resource = await self.smartcar.get_signal(sc_vehicle, sc_user, VIN_SIGNAL)
            except (SmartcarRejected, InvalidPayload) as exc:
                # InvalidPayload: Smartcar listed a vehicle id that is not safe to put in a URL path.
                self._vins[sc_vehicle] = (None, f"the VIN could not be read ({exc.message.rstrip('.')})")
            else:
                vin = _vin_value(resource)
                self._vins[sc_vehicle] = (vin, "" if vin else "the VIN signal has no usable value")
        return self._vins[sc_vehicle]

    def _vehicle_id(self, vehicle: VehicleRecord) -> str | None:
        return vehicle.smartcar_vehicle_id or self._vehicle_links.get(vehicle.id)

    def _owner_id(self, vehicle: VehicleRecord) -> str | None:
        if vehicle.owner_smartcar_user_id is not None or vehicle.user_id is None:
            return vehicle.owner_smartcar_user_id
        return self._user_links.get(vehicle.user_id)

    def progress_bar(self) -> str:
        done = sum(map(len, self.findings.values())) + self.ignored
        if self.total:
            filled = min(BAR_WIDTH, BAR_WIDTH * done // self.total)
            line = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{self.total} connections"
        else:
            line = f"{done} connections"
        return f"{line}, {len(self.findings['matched'])} matched, {len(self.findings['conflict'])} conflicts "


def _vin_value(resource: dict[str, Any]) -> str | None:
    """The VIN of a signal resource (``attributes.body.value``), upper-cased; ``None`` if unusable."""
    if dig(resource, "attributes", "status", "value") not in (None, "SUCCESS"):
        return None
    value = dig(resource, "attributes", "body", "value")
    vin = value.strip().upper() if isinstance(value, str) else ""
    return vin if 0 < len(vin) <= 17 else None


def run_backfill(settings: Settings, dry_run: bool, smartcar_user_id: str | None) -> int:
    settings.require_client_credentials()

    async def run(progress: Callable[[Backfill], None]) -> Backfill:
        # The application token is cached in Redis, shared with the workers; the run is sequential.
        redis = open_command_redis(command_redis_async, settings)
        http = LeanHttp(max_connections=4)
        users = UserStore(settings.database_url)
        try:
            backfill = Backfill(smartcar_client(settings, redis, http), users, dry_run, smartcar_user_id)
            await backfill.run(progress)
            return backfill
        finally:
            await redis.aclose()
            await http.aclose()
            await asyncio.to_thread(users.dispose)

    with progress_line(sys.stderr, Backfill.progress_bar) as show, redis_errors():
        report = asyncio.run(run(show))
    if dry_run:
        print("Dry run: nothing was written.")
    for outcome, title in SECTIONS:
        if report.findings[outcome] and (dry_run or outcome != "matched"):
            print(title, *(f"  {line}" for line in report.findings[outcome]), sep="\n")
    counts = {kind: len(lines) for kind, lines in report.findings.items()}
    parts = [
        f"{'would match' if dry_run else 'matched'} {counts['matched']}",
        f"already linked {counts['already_linked']}",
        f"unmatched {counts['unmatched']}",
        f"conflicts {counts['conflict']}",
    ]
    if counts["failed"]:
        parts.append(f"failed {counts['failed']}")
    seen = sum(counts.values())
    ignored = f"; {report.ignored} of other users ignored" if report.ignored else ""
    print(f"{', '.join(parts)} ({seen} connection{'s' if seen != 1 else ''}{ignored})")
    if report.aborted is not None:
        raise PermanentError(f"stopped early: {report.aborted} Rerun to continue; what was stored is kept.")
    if counts["matched"] and dry_run:
        print("Run `smartcar-ingest backfill` without --dry-run to store these links.")
    elif counts["matched"]:
        print(
            "Events parked while these users were unknown can now be delivered: "
            "smartcar-ingest replay --reason unknown_user"
        )
    return 1 if counts["failed"] else 0
