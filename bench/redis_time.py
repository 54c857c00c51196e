"""``python -m bench.redis_time``: where Redis spends its time per event, function by function.

Runs ``smartcar-ingest worker --burst`` on the worker benchmark's queue (fleet-mix deliveries,
emulator at 100 ms, two reads per event) with Redis's slow log recording every command, then sums
the log's durations by command, an ``FCALL`` by the function it calls. A function's time includes
the commands it runs, which are also listed on their own. The slow log costs Redis time itself, so
this is a profile, not a figure to compare: ``python -m bench --only worker`` measures the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys

from bench.ingest import new_to_the_service
from bench.worker import READ_EVERY_EVENT, Setup, _enqueue_bodies, fleet_bodies
from cli.redis_admin import load_functions
from core.redis.functions import PREFIX


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_time")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    setup = Setup.start()
    client = setup.client
    try:
        new_to_the_service(client)
        load_functions(setup.server.url)  # loaded first: no call finds its function missing
        asyncio.run(_enqueue_bodies(setup.server.url, "smartcar-events", fleet_bodies(args.events)))
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 100 * args.events)
        client.slowlog_reset()
        command = [sys.executable, "-m", "cli.main", "worker", "--burst", "--concurrency", "256"]
        subprocess.run(command, env=setup.env | READ_EVERY_EVENT, stdout=subprocess.DEVNULL, check=True)
        by_name: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for entry in client.slowlog_get(100 * args.events):
            words = entry["command"].split()
            name = words[0].decode().lower()
            if name == "fcall":
                name = words[1].decode().removeprefix(PREFIX).rsplit("_", 1)[0] + " (function)"
            by_name[name][0] += 1
            by_name[name][1] += int(entry["duration"])
    finally:
        setup.stop()
    events = args.events
    print(f"Redis time per event by command, {events} fleet-mix events, two reads each:\n")
    print("| command | calls/event | µs/event | µs/call |\n|---|---:|---:|---:|")
    for name, (calls, usec) in sorted(by_name.items(), key=lambda item: -item[1][1])[: args.top]:
        print(f"| {name} | {calls / events:.2f} | {usec / events:.1f} | {usec / calls:.1f} |")


if __name__ == "__main__":
    main()
