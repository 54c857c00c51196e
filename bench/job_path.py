"""``python -m bench.job_path``: how much of the project's code one job passes through.

Runs ``smartcar-ingest worker --burst`` in this process on one fleet-mix delivery (the worker
benchmark's emulator, two reads per event) with a profile hook that records, at every call of a
project function, the chain of project frames above it. Reported: the deepest chain in the job's
own task, the deepest in a task the job's reads run in (the event loop's own frames left out), the
calls ``workers/processor.py`` makes into other modules, and every project function and module the
job touched. A measure for docs/architecture.md's path of one job, not of speed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from bench.worker import READ_EVERY_EVENT, Setup, _enqueue_bodies, fleet_bodies

ROOT = Path.cwd()
PROJECT = tuple(f"{ROOT / part}/" for part in ("core", "workers", "service", "cli"))
#: Frames that only run the event loop, below a read's task.
LOOP = ("cli/", "workers/worker.py")

Frame = tuple[str, str]


def chain_of(frame: FrameType | None) -> tuple[Frame, ...]:
    """The project frames from the outermost to ``frame``, as (module path, qualified name)."""
    frames: list[Frame] = []
    while frame is not None:
        if frame.f_code.co_filename.startswith(PROJECT):
            frames.append((os.path.relpath(frame.f_code.co_filename, ROOT), frame.f_code.co_qualname))
        frame = frame.f_back
    return tuple(reversed(frames))


class Recorder:
    def __init__(self) -> None:
        self.job: set[tuple[Frame, ...]] = set()
        self.reads: set[tuple[Frame, ...]] = set()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(PROJECT):
            return
        chain = chain_of(frame)
        names = [name for _, name in chain]
        if "AsyncWorker._run_job" in names:
            self.job.add(chain[names.index("AsyncWorker._run_job") :])
        elif any(module.startswith("core/smartcar/") for module, _ in chain):
            self.reads.add(tuple(f for f in chain if not f[0].startswith(LOOP)))


def show(title: str, chain: tuple[Frame, ...]) -> None:
    print(f"{title}: {len(chain)} frames in {len({module for module, _ in chain})} modules")
    for module, name in chain:
        print(f"    {module:34} {name}")


def main() -> None:
    setup = Setup.start()
    recorder = Recorder()
    try:
        asyncio.run(_enqueue_bodies(setup.server.url, "smartcar-events", fleet_bodies(20)[7:8]))
        os.environ.update(setup.env | READ_EVERY_EVENT | {"METRICS_PORT": "0"})
        from cli.main import main as cli_main

        sys.setprofile(recorder)
        threading.setprofile(recorder)
        try:
            cli_main(["worker", "--burst", "--concurrency", "1"])
        except SystemExit:
            pass
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    finally:
        setup.stop()
    if not recorder.job:
        sys.exit("no job ran")
    show("deepest chain in the job's task", max(recorder.job, key=len))
    if recorder.reads:
        show("deepest chain in a read's task", max(recorder.reads, key=len))
    calls = {
        (caller, callee)
        for chain in recorder.job
        for (m1, caller), (m2, callee) in itertools.pairwise(chain)
        if m1 == "workers/processor.py" and m2 != m1
    }
    print(f"calls from workers/processor.py into other modules: {len(calls)}")
    for caller, callee in sorted(calls):
        print(f"    {caller} -> {callee}")
    functions = {frame for chain in recorder.job | recorder.reads for frame in chain}
    modules = sorted({module for module, _ in functions})
    print(f"functions the job touched: {len(functions)} in {len(modules)} modules")
    print("    " + ", ".join(modules))


if __name__ == "__main__":
    main()
