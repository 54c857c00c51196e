"""``make bench``: run the benchmarks, print their tables and record them in docs/performance.md.

The measured tables replace the part of docs/performance.md between the ``BENCH:BEGIN`` and
``BENCH:END`` markers; the analysis around them is written by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

from bench import ingest, worker

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    memory_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return f"{os.cpu_count()} cores ({cpu}), {memory_kb / 1024 / 1024:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--seconds", type=int, default=10, help="measurement time per server (ingest)")
    parser.add_argument("--only", choices=["ingest", "worker"], help="run one benchmark")
    parser.add_argument(
        "--bodies",
        choices=["fleet", "sample"],
        default="fleet",
        help="ingest bodies: the captured fleet mix (1.9-16 KB, default) or the ~1 KB synthetic sample",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    sections = [f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}."]
    if args.only in (None, "ingest"):
        results, mean_size = ingest.run(seconds=args.seconds, mix=args.bodies)
        what = "the captured fleet mix" if args.bodies == "fleet" else "synthetic samples"
        sections.append(
            f"### Ingest: one web process, wrk -t1 -c32, unique signed deliveries ({what}, mean {mean_size:,} B)\n\n"
            + ingest.table(results)
        )
    if args.only in (None, "worker"):
        worker_results = worker.run()
        sections.append(
            "### Enrichment: one worker process; emulator in its own process, 2,000-vehicle fleet\n\n"
            + worker.table(worker_results)
        )
    text = "\n\n".join(sections)
    print("\n" + text)
    if not args.no_write and DOC.exists():
        doc = DOC.read_text()
        block = f"<!-- BENCH:BEGIN -->\n{text}\n<!-- BENCH:END -->"
        DOC.write_text(re.sub(r"<!-- BENCH:BEGIN -->.*<!-- BENCH:END -->", lambda _: block, doc, flags=re.S))
        print(f"\nrecorded in {DOC.relative_to(Path.cwd()) if DOC.is_relative_to(Path.cwd()) else DOC}")


if __name__ == "__main__":
    main()
