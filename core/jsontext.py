"""The worker's hot-path JSON writer: orjson, and pydantic-core for what orjson will not take.

Both write compact UTF-8 JSON in the order of the dicts' keys, with a NaN or an infinity as
``null``. orjson, its answer copied to its size, is about twice as fast on the small documents the
worker writes per event (each signal, the output entry). Where orjson refuses (integers past 64
bits, lone surrogates, nesting past its limit), pydantic-core writes the value or raises as it
always did, so what comes out is what pydantic-core alone gave (tests/test_jsontext.py holds the
two to it). Reading stays with pydantic-core: orjson reads an integer past 64 bits as a float,
silently.
"""

from __future__ import annotations

from typing import Any

import orjson
import pydantic_core


def dumps(value: Any) -> bytes:
    """Compact JSON of ``value`` (decoded JSON: dicts with text keys, lists, scalars); NaN and infinities as null."""
    try:
        # orjson's bytes keep the buffer it wrote into (4 KB for a 100-byte signal): copied to their
        # size, or the signals a merge holds for 256 events in flight cost the worker 35 MB of RSS.
        return bytes(memoryview(orjson.dumps(value)))
    except orjson.JSONEncodeError:
        return pydantic_core.to_json(value, inf_nan_mode="null")
