"""Fixture cases come from the repository alone, and it keeps every capture the team shares."""

from __future__ import annotations

import pytest

from tests.conftest import CAPTURED_DIR, SHARED_CAPTURED_DIR, fixture_paths


def test_fixture_cases_are_the_captures_kept_in_the_repository():
    """Every checkout parametrizes over the same files: those of tests/fixtures/captured/."""
    paths = fixture_paths()
    assert paths
    assert {path.parent for path in paths} == {CAPTURED_DIR}
    assert [path.name for path in paths] == sorted(path.name for path in CAPTURED_DIR.glob("*.json"))


def test_every_shared_capture_is_kept_in_the_repository_byte_for_byte():
    """Each file of ../shared/fixtures/captured/ (when that checkout exists) is in tests/fixtures/captured/ unchanged."""
    if not SHARED_CAPTURED_DIR.is_dir():
        pytest.skip(f"no shared captures at {SHARED_CAPTURED_DIR}")
    shared = sorted(path for path in SHARED_CAPTURED_DIR.iterdir() if path.is_file())
    missing = [path.name for path in shared if not (CAPTURED_DIR / path.name).is_file()]
    changed = [
        path.name
        for path in shared
        if path.name not in missing and (CAPTURED_DIR / path.name).read_bytes() != path.read_bytes()
    ]
    assert (missing, changed) == ([], []), f"copy these from {SHARED_CAPTURED_DIR} into {CAPTURED_DIR}"
