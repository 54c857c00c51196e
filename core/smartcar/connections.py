"""Smartcar's ``GET /v3/connections``: its pages, each item's ids and creation time, and the check that
an account connected since a Connect link was issued (the callback's; ``backfill`` pages the list).
The fields read and why: docs/security.md, "Connect capture"."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator
from typing import Any

from core.errors import InvalidConnectState
from core.smartcar.client import SmartcarClient

#: How far Smartcar's clock may run behind ours when comparing a connection's creation time.
CLOCK_SKEW_SECONDS = 60
MAX_VERIFY_PAGES = 5  # of one user's connections: a user has a handful
PAGE_SIZE = 100  # Smartcar's largest page: fewer calls against the application's rate limit
# Epoch seconds reach 1e11 in the year 5138; epoch milliseconds passed it in 1973.
_EPOCH_MS_FROM = 100_000_000_000
_CREATED_AT_FIELDS = (("attributes", "createdAt"), ("attributes", "connectedAt"), ("createdAt",), ("connectedAt",))


def dig(value: object, *keys: str) -> object:
    """``value[k1][k2]…`` through dicts only; None where a step is missing or not a dict."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def connection_pages(
    smartcar: SmartcarClient, smartcar_user_id: str | None, max_pages: int, page_size: int = PAGE_SIZE
) -> AsyncIterator[tuple[list[Any], int | None]]:
    """Each page of ``GET /v3/connections`` (the user's only, if given): its items and
    ``meta.totalCount``, until ``links.next`` is null, the total is reached or a page is short."""
    for page in range(1, max_pages + 1):
        body = await smartcar.list_connections(page, page_size, smartcar_user_id)
        data, links = body.get("data"), body.get("links")
        items = data if isinstance(data, list) else []
        total = _count(dig(body, "meta", "totalCount"))
        yield items, total
        size = _count(dig(body, "meta", "pageSize")) or page_size
        has_next = isinstance(links, dict) and "next" in links
        if not items or (has_next and not dig(links, "next")) or (total is not None and page * size >= total):
            return
        if not has_next and total is None and len(items) < size:
            return


def connection_ids(item: object) -> tuple[str | None, str | None]:
    """The Smartcar user and vehicle ids of a ``/connections`` item, ``None`` where missing."""
    user, vehicle = dig(item, "attributes", "user", "id"), dig(item, "relationships", "vehicle", "data", "id")
    return (user if isinstance(user, str) and user else None, vehicle if isinstance(vehicle, str) and vehicle else None)


def connection_created_at(item: object) -> float | None:
    """When a ``/connections`` item was made (epoch seconds), or ``None`` when it does not say. The
    fields and forms read: docs/security.md, "Connect capture"; ISO-8601 without an offset is UTC."""
    for path in _CREATED_AT_FIELDS:
        value = dig(item, *path)
        if isinstance(value, str):
            text = value.strip()
            if text.isascii() and text.isdigit():
                value = int(text) if len(text) <= 20 else None  # int() would refuse past 4,300 digits
            else:
                try:
                    parsed = dt.datetime.fromisoformat(text)
                except ValueError:
                    continue
                return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return value / 1000 if value >= _EPOCH_MS_FROM else float(value)
    return None


async def confirm_connection(smartcar: SmartcarClient, smartcar_user_id: str, issued_at: float) -> None:
    """Return when Smartcar lists a connection of ``smartcar_user_id`` made since ``issued_at`` (less the
    clock skew), else InvalidConnectState: ``unverified_user``, or ``cannot_verify`` if undated."""
    undated = False
    async for items, _ in connection_pages(smartcar, smartcar_user_id, MAX_VERIFY_PAGES):
        for item in items:
            if connection_ids(item)[0] != smartcar_user_id:
                continue
            created = connection_created_at(item)
            if created is None:
                undated = True
            elif created >= issued_at - CLOCK_SKEW_SECONDS:
                return
    if undated:
        raise InvalidConnectState(
            "Smartcar gives no creation time for this account's connections, so this redirect cannot be verified "
            "and nothing was linked; an operator can link it from Smartcar's connection list with "
            "`smartcar-ingest backfill`.",
            "cannot_verify",
        )
    raise InvalidConnectState(
        "Smartcar does not list a vehicle this account connected since the Connect link was issued; "
        "nothing was linked. Start again from a fresh Connect link.",
        "unverified_user",
    )
