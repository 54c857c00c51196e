"""The kinds of test (tests/kinds.py) hold: a test that does more than its kind allows fails, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPOSITORY = Path(__file__).resolve().parent.parent

CONFTEST = """
from tests.kinds import _stays_in_its_kind, pytest_collection_modifyitems, pytest_configure, pytest_runtest_protocol
"""

SUITE = """
import os
import signal
import subprocess
import sys

import pytest


def test_starts_a_process_unmarked():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.process
def test_starts_a_process_marked():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.process
def test_kills_a_process_as_a_process_test():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    child.kill()
    child.wait()


@pytest.mark.drill
def test_kills_a_process_as_a_drill():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


@pytest.mark.process
def test_stops_a_process_as_a_process_test():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    child.terminate()
    child.wait()


def test_in_process():
    assert True
"""


@pytest.mark.process
def test_each_test_is_held_to_its_kind(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(REPOSITORY))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=6, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_starts_a_process_unmarked is an inprocess test but starts a process*mark it @pytest.mark.process*",
            "*test_kills_a_process_as_a_process_test is a process test but sends SIGKILL*mark it @pytest.mark.drill*",
        ]
    )


@pytest.mark.process
def test_the_kinds_select_what_each_make_target_runs(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """`make test` deselects the drills; `make drills` selects only them (and Hypothesis tests)."""
    monkeypatch.setenv("PYTHONPATH", str(REPOSITORY))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    fast = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q", "-m", "not drill")
    fast.stdout.fnmatch_lines(["5/6 tests collected (1 deselected)*"])
    drills = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q", "-m", "drill")
    drills.stdout.fnmatch_lines(["*test_kills_a_process_as_a_drill", "1/6 tests collected (5 deselected)*"])
