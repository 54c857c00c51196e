"""The three kinds of test, and the rule that keeps each test in its kind.

- ``inprocess`` (the default, added at collection): real Redis and real HTTP, but no process of its own.
- ``process``: starts a real process (``web``, ``worker``, a redis-server of its own, promtool, helm...).
- ``drill``: kills (SIGKILL), freezes (SIGSTOP) or stops a process under a test, or waits out a long
  settle. Everything under ``tests/drills`` is one.

``make test`` runs the first two, ``make drills`` the third (docs in README.md). The kinds are enforced
while each test runs, by a Python audit hook: a test that starts a process without being a ``process``
or ``drill`` test, or kills, freezes or stops one without being a ``drill``, fails and says why. The
hook sees every start, however indirect (a CLI helper, a fixture), so the split cannot rot.

The private redis-server a test session shares (tests/conftest.py) is started under :func:`infrastructure`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

INPROCESS = "inprocess"
PROCESS = "process"
DRILL = "drill"
KINDS = (INPROCESS, PROCESS, DRILL)
MARKERS = {
    INPROCESS: "real Redis and HTTP in this process, no process of its own (the default kind)",
    PROCESS: "starts a real process: web, worker, emulator, a redis-server of its own, a tool",
    DRILL: "kills, freezes or stops a process under test, or waits out a long settle (make drills)",
}
ARTICLE = {INPROCESS: "an", PROCESS: "a", DRILL: "a"}
#: Signals that make a test a drill: a kill or a freeze, not a shutdown.
DRILL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSTOP})
#: Process starts, as audit events (https://docs.python.org/3/library/audit_events.html).
START_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.exec", "os.spawn"})
DRILLS_DIR = Path(__file__).resolve().parent / "drills"


@dataclass
class Running:
    """The test now running: its kind and what it did beyond it."""

    nodeid: str
    kind: str
    violations: list[str] = field(default_factory=list)


_running: Running | None = None
_exempt = threading.local()


def kind_of(item: pytest.Item) -> str:
    marked = [kind for kind in (DRILL, PROCESS) if item.get_closest_marker(kind) is not None]
    return marked[0] if marked else INPROCESS


@contextlib.contextmanager
def infrastructure() -> Iterator[None]:
    """What runs inside is the session's shared infrastructure, which every kind of test may start."""
    _exempt.active = True
    try:
        yield
    finally:
        _exempt.active = False


def needs(kind: str, what: str) -> None:
    """Record that the running test did ``what``, which only a test of ``kind`` (or a drill) may do."""
    running = _running
    if running is None or getattr(_exempt, "active", False):
        return
    allowed = {DRILL} if kind == DRILL else {PROCESS, DRILL}
    if running.kind not in allowed:
        running.violations.append(f"{what}: mark it @pytest.mark.{kind}")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _running is None:
        return
    if event in START_EVENTS:
        command = args[1] if event == "subprocess.Popen" and len(args) > 1 else args[:1]
        needs(PROCESS, f"starts a process ({event}: {str(command)[:120]})")
    elif event in {"os.kill", "os.killpg"} and len(args) == 2 and args[1] in DRILL_SIGNALS:
        needs(DRILL, f"sends {signal.Signals(args[1]).name} ({event})")


sys.addaudithook(_audit)


def pytest_configure(config: pytest.Config) -> None:
    for kind, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{kind}: {help_text}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(DRILLS_DIR):
            item.add_marker(DRILL)
        kinds = [kind for kind in (DRILL, PROCESS, INPROCESS) if item.get_closest_marker(kind) is not None]
        if INPROCESS in kinds and len(kinds) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {kinds}: a test has one kind")
        if not kinds:
            item.add_marker(INPROCESS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    global _running
    _running = Running(item.nodeid, kind_of(item))
    try:
        return (yield)
    finally:
        _running = None


@pytest.fixture(autouse=True)
def _stays_in_its_kind() -> Iterator[None]:
    """Fails a test that did what its kind may not (checked after every other fixture's teardown)."""
    yield
    running = _running
    if running is not None and running.violations:
        unique = list(dict.fromkeys(running.violations))
        pytest.fail(
            f"{running.nodeid} is {ARTICLE[running.kind]} {running.kind} test but " + "; ".join(unique), pytrace=False
        )
