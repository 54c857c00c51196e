"""Times and years as Smartcar sends them, read without ever raising.

Epoch milliseconds, epoch seconds or ISO-8601 strings, and years as numbers or digit strings;
anything else (NaN, infinities, bools, huge digit strings, far-future dates) reads as None, so a
hostile value neither crashes the worker nor reaches the output as invalid JSON.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

# Epoch values below this are taken as seconds (10 digits), above it as milliseconds (13 digits).
_SECONDS_CUTOFF = 100_000_000_000
# 9999-12-31T23:59:59.999Z: later (or negative) times are unreadable, not errors.
_MAX_EPOCH_MS = 253_402_300_799_999
# ASCII digits only: str.isdigit() also admits "²" and other digits that int() refuses.
_EPOCH_DIGITS = re.compile(r"[0-9]{1,19}")
_YEAR_DIGITS = re.compile(r"[0-9]{1,4}")
_LONGEST_TIME_TEXT = 64


def epoch_ms(value: object) -> int | None:
    """Epoch milliseconds from epoch ms, epoch seconds or an ISO-8601 string; None if unreadable.

    Never raises: NaN, infinities, bools, negative or far-future times, digit strings too long
    to be a time, naive or malformed ISO strings and values of any other type all give None.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        number = round(value * 1000) if 0 < value < _SECONDS_CUTOFF else int(value)
        return number if 0 <= number <= _MAX_EPOCH_MS else None
    elif isinstance(value, str):
        text = value.strip()
        if _EPOCH_DIGITS.fullmatch(text):
            number = int(text)
        else:
            return _iso_epoch_ms(text)
    else:
        return None
    if 0 < number < _SECONDS_CUTOFF:
        number *= 1000
    return number if 0 <= number <= _MAX_EPOCH_MS else None


def _iso_epoch_ms(text: str) -> int | None:
    if len(text) > _LONGEST_TIME_TEXT:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            return None
        number = int(parsed.timestamp() * 1000)
    except (ValueError, OverflowError):
        return None
    return number if 0 <= number <= _MAX_EPOCH_MS else None


def delivered_at(value: object) -> int | str | None:
    """``meta.deliveredAt`` as epoch ms; an unreadable short text is kept as sent; else None."""
    as_ms = epoch_ms(value)
    if as_ms is not None:
        return as_ms
    # An unreadable text time is kept as sent (short ones only); anything else is dropped.
    return value if isinstance(value, str) and len(value) <= _LONGEST_TIME_TEXT else None


def retrieved_at(retrieved: object, fetched: object) -> int | None:
    """When a signal was read, as epoch ms: ``retrievedAt`` when it is there, else ``fetchedAt``.

    Smartcar spells this time either way, in webhook signals and in ``/signals`` resources alike,
    and both read it through this one rule. "There" means present and not null: a ``0``, ``""`` or
    ``false`` is the value sent and is read as such (``0`` is the epoch, the others unreadable),
    never skipped in favour of ``fetchedAt``.
    """
    return epoch_ms(retrieved if retrieved is not None else fetched)


def model_year(value: object) -> int | None:
    """A model year from an int, a whole float or a digit string; None for anything else."""
    year: int
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        year = value
    elif isinstance(value, float) and value.is_integer():
        year = int(value)
    elif isinstance(value, str) and _YEAR_DIGITS.fullmatch(value.strip()):
        year = int(value.strip())
    else:
        return None
    return year if 1 <= year <= 9999 else None
