"""Stream keys spoiled the two ways Redis then refuses an ``XADD`` of ours, by the text of its refusal."""

from __future__ import annotations

from collections.abc import Callable

from redis import Redis

#: The key holds a string; or the stream's last id is the largest one (set by hand: ``XSETID`` or an
#: ``XADD`` with that id), so no entry can follow it.
SPOILED_STREAMS: dict[str, Callable[[Redis, str], object]] = {
    "WRONGTYPE": lambda client, key: client.set(key, "not a stream"),
    "exhausted the last possible ID": lambda client, key: client.xadd(
        key, {"f": "v"}, id="18446744073709551615-18446744073709551615"
    ),
}
