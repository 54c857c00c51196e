"""``make bench``: run the benchmarks and print their tables (``--write`` also updates docs/performance.md)."""

from __future__ import annotations

import argparse

from bench import ingest, worker


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--seconds", type=int, default=10, help="measurement time per server")
    parser.add_argument("--only", choices=["ingest", "worker"], help="run one benchmark")
    args = parser.parse_args()
    if args.only in (None, "ingest"):
        results = ingest.run(seconds=args.seconds)
        print("\nIngest (one web process, wrk -t1 -c32, unique signed ~1 KB deliveries)\n")
        print(ingest.table(results))
    if args.only in (None, "worker"):
        worker_results = worker.run()
        print("\nEnrichment (one worker process; emulator in its own process, fleet of 2,000 vehicles)\n")
        print(worker.table(worker_results))


if __name__ == "__main__":
    main()
