"""`smartcar-ingest backfill` against the emulator over real HTTP, a real Redis and real databases.

The internal database starts in the guide's "before" shape, migrated to phase 2, holding the
emulator's seed VINs (``1FAKEVIN00TEST001``… , see emulator/captured.py) under internal users:

| internal | vehicle (VIN) | Smartcar (emulator seed) | expected |
|---|---|---|---|
| user 1 | 10 (…001), 11 (…002) | 2fbd0033… owns a1d50709…, 70076e4a… | matched (both) |
| user 2 | 12 (…003) | da4ef0df… owns b3014ded… | matched |
| user 3, linked | 13 (…007), linked | 9e8d7c6b… owns 5f0c1a2b… | already linked |
| user 4, linked elsewhere | 14 (…005) | 9c9cde56-7d04… owns db745230… | conflict: user has another Smartcar user |
| user 5 | 15 (…006) | 9c9cde56-3333… (held by user 6) owns 875d9333… | conflict: Smartcar user held by another user |
| nobody | (…004) | XXXXXX owns 27192cce… | unmatched |
| user 7 | 16 (…999) | not connected | untouched |
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import httpx
import pytest
import stamina

from cli.main import main
from core.errors import LinkConflict, RecordNotFound
from core.store import db
from core.store.users import UserStore
from tests.databases import BACKENDS, empty_database, execute, query
from tests.pipeline import CLIENT_ID, CLIENT_SECRET, emulator_stats, inject

VW_USER = "2fbd0033-83e7-43b8-a367-776d6dff1134"
VW, IONIQ = "a1d50709-3502-4faa-ba43-a5c7565e6a09", "70076e4a-d774-464c-8241-60de654ccb24"
BYD_USER, BYD = "da4ef0df-73b9-4ad7-8c59-1b15ff646f0b", "b3014ded-85db-4f12-8923-7a231354d8d0"
TESLA_USER, TESLA = "9e8d7c6b-2222-4222-8222-222222222222", "5f0c1a2b-1111-4111-8111-111111111111"
JAGUAR_USER, JAGUAR = "9c9cde56-7d04-468b-a80a-a398bec0ce1e", "db745230-7f7c-4791-bcaa-185facf371be"
POLESTAR_USER, POLESTAR = "9c9cde56-3333-5555-6666-7e50207e6e64", "875d9333-bbbb-4444-aaaa-17be22ebe970"
ELSEWHERE = "00000000-0000-4000-8000-0000000000ee"
SIGNAL_ROUTE = "/v3/vehicles/{id}/signals/{code}"
CONNECTIONS_ROUTE = "/v3/connections"


def build_before_database(url: str) -> None:
    """The table above: the "before" schema with tokens, then phase 2 and the links made so far."""
    db.upgrade(url, "v2_schema")
    execute(
        url,
        "INSERT INTO users (id, email, name) VALUES (:id, :email, :name)",
        [{"id": i, "email": f"u{i}@example.test", "name": f"User {i}"} for i in range(1, 8)],
    )
    vehicles = [(10, 1, "001"), (11, 1, "002"), (12, 2, "003"), (13, 3, "007"), (14, 4, "005"), (15, 5, "006")]
    execute(
        url,
        "INSERT INTO vehicles (id, user_id, vin, vehicle_access_token) VALUES (:id, :user_id, :vin, :token)",
        [{"id": v, "user_id": u, "vin": f"1FAKEVIN00TEST{n}", "token": f"tok-{v}"} for v, u, n in vehicles]
        + [{"id": 16, "user_id": 7, "vin": "1fakevin00test999", "token": None}],
    )
    db.upgrade(url, "v2_v3_bridge")
    execute(
        url,
        "UPDATE users SET smartcar_user_id = :sc WHERE id = :id",
        [{"id": 3, "sc": TESLA_USER}, {"id": 4, "sc": ELSEWHERE}, {"id": 6, "sc": POLESTAR_USER}],
    )
    execute(url, "UPDATE vehicles SET smartcar_vehicle_id = :sc WHERE id = 13", [{"sc": TESLA}])


def links(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    users = query(url, "SELECT id, smartcar_user_id FROM users ORDER BY id")
    vehicles = query(url, "SELECT id, smartcar_vehicle_id, vehicle_access_token FROM vehicles ORDER BY id")
    return users, vehicles


@pytest.fixture
def fast_retries() -> Iterator[None]:
    stamina.set_testing(True, attempts=2)
    yield
    stamina.set_testing(False)


@pytest.fixture(params=BACKENDS)
def before_database(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    with empty_database(request.param, tmp_path) as url:
        build_before_database(url)
        yield url


@pytest.fixture
def sqlite_before_database(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'before.db'}"
    build_before_database(url)
    return url


@pytest.fixture
def backfill(redis_url, emulator, capsys, monkeypatch, tmp_path):
    """Run `smartcar-ingest backfill ARGS` on a database: its exit status, stdout and stderr."""
    monkeypatch.chdir(tmp_path)  # no .env
    for name, value in {
        "REDIS_URL": redis_url,
        "SMARTCAR_CLIENT_ID": CLIENT_ID,
        "SMARTCAR_CLIENT_SECRET": CLIENT_SECRET,
        "SMARTCAR_API_URL": f"{emulator}/v3",
        "SMARTCAR_TOKEN_URL": f"{emulator}/oauth2/token",
    }.items():
        monkeypatch.setenv(name, value)

    def run(database_url, *args):
        monkeypatch.setenv("DATABASE_URL", database_url)
        status = main(["backfill", *args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_backfill_links_matches_and_reports_the_rest(emulator, before_database, fast_retries, backfill, monkeypatch):
    """A run over several pages links by VIN, skips what is linked, and reports conflicts and unmatched."""
    monkeypatch.setattr("cli.backfill.PAGE_SIZE", 3)
    status, out, _ = backfill(before_database)
    assert status == 0
    assert "matched 3, already linked 1, unmatched 1, conflicts 2 (7 connections)" in out
    assert "replay --reason unknown_user" in out
    assert emulator_stats(emulator)["calls"][CONNECTIONS_ROUTE] == 3  # 7 connections, 3 per page
    users, vehicles = links(before_database)
    assert users == [
        (1, VW_USER),
        (2, BYD_USER),
        (3, TESLA_USER),
        (4, ELSEWHERE),  # never overwritten
        (5, None),  # POLESTAR_USER stays with user 6
        (6, POLESTAR_USER),
        (7, None),
    ]
    assert vehicles == [
        (10, VW, "tok-10"),
        (11, IONIQ, "tok-11"),
        (12, BYD, "tok-12"),
        (13, TESLA, "tok-13"),
        (14, None, "tok-14"),
        (15, None, "tok-15"),
        (16, None, None),
    ]
    assert "vehicle 14 belongs to user 4, linked to Smartcar user " + ELSEWHERE in out
    assert f"Smartcar user {POLESTAR_USER} already belongs to user 6" in out
    assert "no internal vehicle has VIN 1FAKEVIN00TEST004" in out


def test_dry_run_prints_the_plan_and_writes_nothing(emulator, sqlite_before_database, fast_retries, backfill):
    """--dry-run reports exactly what a real run would do and leaves every row as it was."""
    before = links(sqlite_before_database)
    status, out, _ = backfill(sqlite_before_database, "--dry-run")
    assert status == 0
    assert "\nDry run: nothing was written.\nPlanned:\n" in "\n" + out  # log lines may come first
    assert f"would link vehicle 10 → Smartcar vehicle {VW}; user 1 → Smartcar user {VW_USER} (by VIN" in out
    # The second VW-owner vehicle sees the planned user link: only the vehicle is left to link.
    assert f"would link vehicle 11 → Smartcar vehicle {IONIQ} (by VIN 1FAKEVIN00TEST002)" in out
    assert "would match 3, already linked 1, unmatched 1, conflicts 2 (7 connections)" in out
    assert "without --dry-run" in out
    assert links(sqlite_before_database) == before


def test_second_run_changes_nothing_and_reads_no_linked_vin(emulator, sqlite_before_database, fast_retries, backfill):
    """A rerun is idempotent: everything linked is found by id (no VIN read) and nothing is written."""
    backfill(sqlite_before_database)
    after_first = links(sqlite_before_database)
    vin_reads_first = emulator_stats(emulator)["calls"][SIGNAL_ROUTE]
    status, out, _ = backfill(sqlite_before_database)
    assert status == 0
    assert "matched 0, already linked 4, unmatched 1, conflicts 2 (7 connections)" in out
    assert "replay" not in out
    assert links(sqlite_before_database) == after_first
    # Only the three connections still without a link read their VIN again.
    assert emulator_stats(emulator)["calls"][SIGNAL_ROUTE] - vin_reads_first == 3
    assert vin_reads_first == 6  # the Tesla was found by its stored id from the start


def test_a_failing_vehicle_is_reported_and_a_rerun_finishes_it(
    emulator, sqlite_before_database, fast_retries, backfill
):
    """A vehicle whose VIN read keeps failing is `failed` (exit 1) while the others proceed; a rerun links it."""
    inject(emulator, path=f"/v3/vehicles/{BYD}", status=503, count=20)
    status, out, _ = backfill(sqlite_before_database)
    assert status == 1
    assert "matched 2, already linked 1, unmatched 1, conflicts 2, failed 1 (7 connections)" in out
    assert f"Smartcar vehicle {BYD} of Smartcar user {BYD_USER}: Smartcar answered 503" in out
    assert links(sqlite_before_database)[0][1] == (2, None)
    httpx.delete(f"{emulator}/_emulator/failures").raise_for_status()
    status, out, _ = backfill(sqlite_before_database)
    assert status == 0
    assert "matched 1, already linked 3, unmatched 1, conflicts 2 (7 connections)" in out
    assert links(sqlite_before_database)[0][1] == (2, BYD_USER)


def test_listing_failure_stops_the_run_with_exit_1(emulator, sqlite_before_database, fast_retries, backfill):
    """When /v3/connections itself keeps failing, the run stops early, says so and writes nothing."""
    before = links(sqlite_before_database)
    inject(emulator, path=CONNECTIONS_ROUTE, status=503, count=20)
    status, out, err = backfill(sqlite_before_database)
    assert status == 1
    [line] = err.strip().splitlines()
    assert line.startswith("smartcar-ingest backfill: stopped early: ")
    assert "Rerun to continue" in line
    assert "(0 connections)" in out
    assert links(sqlite_before_database) == before


def test_progress_bar_only_on_a_terminal(sqlite_before_database, fast_retries, backfill, monkeypatch):
    """On a terminal stderr shows a bar with the connection count; elsewhere it stays quiet."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    captured, terminal = sys.stderr, Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    backfill(sqlite_before_database, "--dry-run")
    assert f"\r[{'#' * 30}] 7/7 connections" in terminal.getvalue()
    monkeypatch.setattr(sys, "stderr", captured)
    assert backfill(sqlite_before_database, "--dry-run")[2] == ""


def test_user_filter_is_applied_on_the_server_and_again_on_each_item(sqlite_before_database, fast_retries, backfill):
    """With a Smartcar user id, only that user's connections are processed."""
    status, out, _ = backfill(sqlite_before_database, "--dry-run", "--smartcar-user-id", VW_USER)
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("  ")] == [
        f"  Smartcar vehicle {VW} of Smartcar user {VW_USER}: would link vehicle 10 → Smartcar vehicle {VW}; "
        f"user 1 → Smartcar user {VW_USER} (by VIN 1FAKEVIN00TEST001).",
        f"  Smartcar vehicle {IONIQ} of Smartcar user {VW_USER}: would link vehicle 11 → Smartcar vehicle {IONIQ} "
        "(by VIN 1FAKEVIN00TEST002).",
    ]
    assert "would match 2, already linked 0, unmatched 0, conflicts 0 (2 connections)" in out


def test_cli_backfill_without_credentials_is_one_line(monkeypatch, tmp_path, capsys):
    """Without client credentials `backfill` exits 2 with one line naming the variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SMARTCAR_CLIENT_ID", raising=False)
    monkeypatch.delenv("SMARTCAR_CLIENT_SECRET", raising=False)
    assert main(["backfill"]) == 2
    err = capsys.readouterr().err
    assert "SMARTCAR_CLIENT_ID" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def store(before_database) -> Iterator[UserStore]:
    users = UserStore(before_database)
    yield users
    users.dispose()


def test_store_finds_vehicles_by_vin_ignoring_case_and_by_smartcar_id(store):
    """VIN lookups ignore case and blanks; Smartcar-id lookups carry the owner's Smartcar user id."""
    [by_vin] = store.find_vehicles_by_vin(" 1fakevin00test999 ")
    assert (by_vin.id, by_vin.user_id, by_vin.owner_smartcar_user_id) == (16, 7, None)
    [by_id] = store.find_vehicles_by_smartcar_id(TESLA)
    assert (by_id.id, by_id.owner_smartcar_user_id) == (13, TESLA_USER)
    assert store.find_vehicles_by_vin("") == []
    assert store.find_vehicles_by_smartcar_id("x" * 37) == []


def test_link_vehicle_stores_both_ids_or_neither(store, before_database):
    """`link_vehicle` writes the vehicle and owner ids together, and never overwrites either."""
    store.link_vehicle(10, VW, VW_USER)
    linked = links(before_database)
    assert (linked[0][0], linked[1][0][:2]) == ((1, VW_USER), (10, VW))
    store.link_vehicle(10, VW, VW_USER)  # again: nothing to do
    assert links(before_database) == linked
    with pytest.raises(LinkConflict, match="refusing to overwrite"):
        store.link_vehicle(10, IONIQ, VW_USER)  # the vehicle holds another Smartcar vehicle
    with pytest.raises(LinkConflict):
        store.link_vehicle(14, JAGUAR, JAGUAR_USER)  # user 4 holds another Smartcar user
    with pytest.raises(LinkConflict, match="already belongs to user 6"):
        store.link_vehicle(15, POLESTAR, POLESTAR_USER)
    with pytest.raises(RecordNotFound):
        store.link_vehicle(99, VW, VW_USER)
    _, vehicles = links(before_database)
    assert [v[:2] for v in vehicles if v[0] in (14, 15)] == [(14, None), (15, None)]  # nothing half-written
