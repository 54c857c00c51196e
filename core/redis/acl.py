"""Redis ACL rules for the web and worker roles, so each logs in with only what it needs (what each
may do and why: docs/security.md, "One Redis user per role")."""

from __future__ import annotations

import hashlib
from typing import Literal

from rq.queue import Queue

from core.config import Settings
from core.redis.keys import (
    ALIVE_PREFIX,
    CONNECT_STATE_PREFIX,
    DEDUPE_PREFIX,
    DEQUEUED_PREFIX,
    EVENT_IDS_KEY,
    PARKED_IDS_KEY,
    PARKED_MARK_PREFIX,
    RQ_PREFIX,
    SERVICE_PREFIX,
    STAGED_JOB_PREFIX,
    TOKEN_KEY,
    TOKEN_LOCK_KEY,
    WORKERS_SET,
    queue_key,
)

Role = Literal["web", "worker"]


#: PING, HELLO, AUTH, SELECT, CLIENT SETNAME/SETINFO/ID…, without the dangerous CLIENT KILL/LIST/PAUSE.
_CONNECTION = ["+@connection", "-@dangerous"]
#: Lua only as the functions an admin loaded: no role runs code of its own (no EVAL, SCRIPT, FUNCTION).
_SCRIPTS = ["-@scripting", "+fcall", "+fcall_ro"]
#: What the web reads, on every key it touches: the marks and their registries, the legacy marks, RQ's
#: keys and the output stream's length for /metrics and /readyz. It writes only through the selectors.
_WEB_READS = [
    *("+get", "+hget", "+exists", "+hlen", "+llen", "+lindex", "+xlen", "+zcard", "+smembers", "+lrange"),
    # Redis's clock for the marks; the accept's transaction (job hashes staged, then renamed or dropped)
    *("+time", "+multi", "+exec"),
    # Redis's used and max memory for /metrics and the startup warning: INFO's memory section only
    "+info|memory",
]


def _selector(commands: list[str], keys: list[str]) -> str:
    return "(" + " ".join([*commands, *keys]) + ")"


def acl_rules(settings: Settings, role: Role, connect: bool = False) -> list[str]:
    """With ``connect``, the web may also use the sealed application token (the Connect callback verifies user ids)."""
    if role == "web":
        queue, parked = queue_key(settings.ingest_queue), settings.parked_stream
        registries = [f"~{EVENT_IDS_KEY}", f"~{PARKED_IDS_KEY}"]
        mark_hashes = [f"~{EVENT_IDS_KEY}:*", f"~{PARKED_IDS_KEY}:*"]
        staged, connect_states = f"~{STAGED_JOB_PREFIX}*", f"~{CONNECT_STATE_PREFIX}*"
        lock = [f"~{TOKEN_LOCK_KEY}"] if connect else []
        token = [f"~{TOKEN_KEY}", *lock] if connect else []
        # Redis tries a key against these in order, and each try walks the shared `smartcar-ingest:`
        # prefix: the marks' hashes, four reads an accepted event, come first.
        readable = [
            *mark_hashes,
            *registries,
            # per-key marks of earlier versions, read during the legacy window (core.redis.dedupe)
            f"~{DEDUPE_PREFIX}*",
            f"~{PARKED_MARK_PREFIX}*",
            connect_states,
            *token,
            f"~{RQ_PREFIX}*",
            f"~{parked}",
            f"~{settings.output_stream}",
            # the stranded-jobs gauges: who is alive and what each worker holds (core.redis.queue_metrics)
            f"~{ALIVE_PREFIX}*",
            f"~{WORKERS_SET}",
            f"~{DEQUEUED_PREFIX}*",
        ]
        # Each write command reaches only the keys it is for (docs/security.md, "One Redis user per
        # role"): no write of the web can wipe the queue, the parked stream or a job, or give a key
        # that every pod reads another type.
        writes = [
            # the functions' declared keys, which FCALL must be able to write (what each function
            # then writes is checked command by command): the enqueue's queue and RQ's set of queues,
            # the park's stream, the compare-then-delete of a Connect state mark or the token lock
            _selector(["+fcall"], [f"~{queue}", f"~{Queue.redis_queues_keys}", f"~{parked}", connect_states, *lock]),
            _selector(["+rpush"], [f"~{queue}"]),
            _selector(["+sadd"], [f"~{Queue.redis_queues_keys}"]),
            _selector(["+xadd"], [f"~{parked}"]),
            # a mark written, its hash's expiry set, a parked mark replaced
            _selector(["+hset"], [staged, *mark_hashes]),
            _selector(["+expireat", "+hdel"], mark_hashes),
            # the marks' registries, Connect's state marks and, with Connect, the token and its lock
            _selector(["+set"], [*registries, connect_states, *token]),
            # a Connect state mark given back, the staged hash of a repeated event dropped, the token
            # lock released (both compare-then-delete)
            _selector(["+del"], [connect_states, staged, *lock]),
            # only from a staged job hash to a job: renamed onto a staged key, and then deleted, the
            # queue or the parked stream would be gone
            _selector(["+rename"], [staged, f"%W~{RQ_PREFIX}job:*"]),
        ]
        reads = [f"%R{pattern}" for pattern in readable]
        # with Connect, whether the token lock is one that expires (core.smartcar.tokens)
        connect_reads = ["+pttl"] if connect else []
        rules = [*_CONNECTION, *_SCRIPTS, *_WEB_READS, *connect_reads, *reads, *writes]
        return ["resetkeys", "resetchannels", "-@all", *rules]
    return [
        "resetkeys",
        "resetchannels",
        "+@all",
        "-@dangerous",
        *_SCRIPTS,
        "+info",
        f"~{RQ_PREFIX}*",
        f"~{SERVICE_PREFIX}*",
        f"~{settings.output_stream}",
        f"~{settings.parked_stream}",
        # the per-vehicle latest state, merged as each event is published (core.redis.vehicle_state)
        f"~{settings.vehicle_state_prefix}*",
        f"&{RQ_PREFIX}*",
    ]


def acl_file_line(settings: Settings, role: Role, user: str, password: str | None, connect: bool = False) -> str:
    """The password is stored as its SHA-256; without one the user is switched off until ``ACL SETUSER``."""
    credentials = ["on", "#" + hashlib.sha256(password.encode()).hexdigest()] if password else ["off"]
    rules = [rule for rule in acl_rules(settings, role, connect) if rule not in ("resetkeys", "resetchannels")]
    return " ".join(["user", user, *credentials, *rules])
