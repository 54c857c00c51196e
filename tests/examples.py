"""How many examples each Hypothesis test draws: about 100 in ``make test``, the full count in ``make drills``.

A test states its full count as ``@settings(max_examples=examples(500))``; ``make drills`` sets
``TEST_FULL_EXAMPLES=1`` and runs every Hypothesis test (the ``hypothesis`` marker) at that count.
"""

from __future__ import annotations

import os

#: The count in ``make test``: Hypothesis's own default, enough to catch the common cases fast.
QUICK_EXAMPLES = 100
FULL = os.environ.get("TEST_FULL_EXAMPLES") == "1"


def examples(full: int) -> int:
    """``full`` under ``make drills``, at most :data:`QUICK_EXAMPLES` otherwise."""
    return full if FULL else min(full, QUICK_EXAMPLES)
