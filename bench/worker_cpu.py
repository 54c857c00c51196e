"""``python -m bench.worker_cpu``: the worker's per-event Python work without I/O, in CPU time.

For the worker benchmark's fleet-mix deliveries and the emulator's answers for their vehicles: read
the body (``parse_stored``), read the two answers (JSON), build the output document, plan the
merge's writes (``newest_versions`` and each version's JSON) and the stream fields. The network,
Redis and the event loop are left out: this is the part a change to the code of one event shows,
whatever else the machine runs. ``--profile`` prints cProfile's top functions instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import pydantic_core

from bench.worker import fleet_bodies
from core.events.parse import parse_stored
from core.redis.vehicle_state import _stored_json, newest_versions
from core.store.users import UserRecord
from emulator.catalog import Catalog
from emulator.seed import seed_fleet
from workers.output import Enrichment, build_document, stream_fields


def _cases(count: int) -> list[tuple[bytes, bytes, bytes]]:
    """(delivery body, vehicle answer, signals answer) for ``count`` fleet-mix events."""
    catalog = Catalog(seed_fleet(2000))
    cases = []
    for _, body in fleet_bodies(count):
        vehicle_id = pydantic_core.from_json(body)["data"]["vehicle"]["id"]
        page = catalog.signals_page(vehicle_id, 1, 100, "http://emulator/v3")
        cases.append((body.encode(), catalog.vehicle_body(vehicle_id), page))
    return cases


def one_event(body: bytes, vehicle_answer: bytes, signals_answer: bytes) -> dict[str, str]:
    event = parse_stored(body)
    enrichment = Enrichment()
    enrichment.reads = {
        "vehicle": {"source": "fetched", "fetchedAt": 1767000000000, "reason": None},
        "signals": {"source": "fetched", "fetchedAt": 1767000000000, "reason": None},
    }
    enrichment.vehicle = pydantic_core.from_json(vehicle_answer)
    enrichment.signals = pydantic_core.from_json(signals_answer)["data"]
    user = UserRecord(7, None, None, event.smartcar_user_id)
    document = build_document(event, user, enrichment, 1767000000000, 1767000000100)
    newest = newest_versions([*document["signals"], *document["latestSignals"]])
    for _, signal, _ in newest.values():
        _stored_json(signal)
    return stream_fields(event, user, document)


def run(cases: list[tuple[bytes, bytes, bytes]], rounds: int) -> float:
    """Microseconds of CPU per event, the best of ``rounds`` passes over ``cases``."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for case in cases:
            one_event(*case)
        best = min(best, (time.process_time() - started) / len(cases) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_cpu")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    cases = _cases(args.events)
    run(cases, 1)  # warm up
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run, cases, args.rounds)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    print(f"{run(cases, args.rounds):.1f} us CPU per event (best of {args.rounds} over {len(cases)} events)")


if __name__ == "__main__":
    main()
