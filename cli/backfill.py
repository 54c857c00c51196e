"""``smartcar-ingest backfill``: :mod:`cli.connections` on a terminal (clients, progress bar, report).
What it does and its exit status: docs/migration.md, "Step 3"; README.md, "Exit codes"."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from cli.connections import PAGE_SIZE, Backfill, BackfillReport, Outcome
from cli.operations import open_command_redis_async, redis_errors
from core.config import Settings
from core.smartcar.client import smartcar_client
from core.smartcar.http import smartcar_http
from core.store.users import UserStore

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
    interactive = err.isatty()

    def progress(report: BackfillReport) -> None:
        done = report.seen + report.ignored
        if report.total:
            filled = min(_BAR_WIDTH, _BAR_WIDTH * done // report.total)
            line = f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {done}/{report.total} connections"
        else:
            line = f"{done} connections"
        err.write(f"\r{line}, {report.counts['matched']} matched, {report.counts['conflict']} conflicts ")
        err.flush()

    async def run() -> BackfillReport:
        # The application token is cached in Redis, shared with the workers.
        redis = open_command_redis_async(settings)
        # A handful of connections: the run is sequential, and Smartcar's application rate limit
        # is the bottleneck, not the pool.
        http = smartcar_http(max_connections=4)
        users = UserStore(settings.database_url)
        try:
            backfill = Backfill(
                smartcar_client(settings, redis, http),
                users,
                dry_run=dry_run,
                smartcar_user_id=smartcar_user_id,
                page_size=page_size,
                progress=progress if interactive else None,
            )
            return await backfill.run()
        finally:
            await redis.aclose()
            await http.aclose()
            await asyncio.to_thread(users.dispose)

    try:
        with redis_errors():
            report = asyncio.run(run())
    finally:
        if interactive:
            err.write("\n")
    return _print_report(report, out, err)


def _print_report(report: BackfillReport, out: TextIO, err: TextIO) -> int:
    if report.dry_run:
        print("Dry run: nothing was written.", file=out)
        planned = report.of("matched")
        if planned:
            print("Planned:", file=out)
            for finding in planned:
                print(f"  {finding.detail}", file=out)
    for outcome, title in _SECTIONS:
        findings = report.of(outcome)
        if findings:
            print(title, file=out)
            for finding in findings:
                print(f"  {finding.detail}", file=out)
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
