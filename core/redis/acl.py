"""Redis ACL rules for the web and worker roles, so each logs in with only what it needs (what each
may do and why: docs/security.md, "One Redis user per role")."""

from __future__ import annotations

import hashlib
from typing import Literal

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
_WEB_COMMANDS = [
    # what the accept and park scripts and the Connect state marks write
    *("+set", "+get", "+hset", "+rpush", "+sadd", "+xadd", "+exists"),
    # the accept's transaction: job hashes staged, then renamed to the job (a selector) or dropped
    *("+multi", "+exec"),
    # the eventId marks: Redis's clock, the hashes' sizes and expiry, a parked mark replaced
    *("+time", "+hlen", "+expireat", "+hdel"),
    # what /metrics and /readyz read
    *("+llen", "+lindex", "+xlen", "+zcard", "+hget", "+smembers", "+lrange"),
    # Redis's used and max memory for /metrics and the startup warning: INFO's memory section only
    "+info|memory",
]


def acl_rules(settings: Settings, role: Role, connect: bool = False) -> list[str]:
    """With ``connect``, the web may also use the sealed application token (the Connect callback verifies user ids)."""
    if role == "web":
        keys = [
            f"~{EVENT_IDS_KEY}*",
            f"~{PARKED_IDS_KEY}*",
            # per-key marks of earlier versions, read during the legacy window (core.redis.dedupe)
            f"~{DEDUPE_PREFIX}*",
            f"~{PARKED_MARK_PREFIX}*",
            f"~{CONNECT_STATE_PREFIX}*",
            f"~{STAGED_JOB_PREFIX}*",
            f"~{RQ_PREFIX}job:*",
            f"~{queue_key(settings.ingest_queue)}",
            f"~{RQ_PREFIX}queues",
            f"~{settings.parked_stream}",
            f"%R~{RQ_PREFIX}*",
            f"%R~{settings.output_stream}",
            # the stranded-jobs gauges: who is alive and what each worker holds (core.redis.queue_metrics)
            f"%R~{ALIVE_PREFIX}*",
            f"%R~{WORKERS_SET}",
            f"%R~{DEQUEUED_PREFIX}*",
        ]
        # DEL only where needed (a selector): a Connect state mark given back, the token lock
        # released (both compare-then-delete), the staged job hash of a repeated event dropped
        deletable = [f"~{CONNECT_STATE_PREFIX}*", f"~{STAGED_JOB_PREFIX}*"]
        if connect:
            keys.append(f"~{TOKEN_KEY}*")
            deletable.append(f"~{TOKEN_LOCK_KEY}")
        selector = "(" + " ".join(["+del", *deletable]) + ")"
        # RENAME only from a staged job hash to a job: renamed onto a staged key, and then deleted, the
        # queue or the parked stream would be gone
        renames = f"(+rename ~{STAGED_JOB_PREFIX}* %W~{RQ_PREFIX}job:*)"
        rules = [*_CONNECTION, *_SCRIPTS, *_WEB_COMMANDS, *keys, selector, renames]
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
