"""Redis's persistence settings against what docs/deploy.md ("Redis") asks of a Redis that runs this
service: read with ``CONFIG GET`` by ``redis-setup``, an admin's command (neither role may read the
configuration). A 2xx is a promise that the event is kept, and these settings decide whether it is."""

from __future__ import annotations

import redis

from core.redis.keys import text

#: The settings read, each checked below, as docs/deploy.md recommends them.
RECOMMENDED = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "save": "",
    "rdbcompression": "no",
    "auto-aof-rewrite-percentage": "200",
}
SETTINGS = tuple(RECOMMENDED)
#: Save points more frequent than this snapshot the whole data set for nothing the AOF does not keep.
RARE_SAVE_SECONDS = 3600
WHERE = 'docs/deploy.md, "Redis"'


def read_settings(client: redis.Redis) -> dict[str, str]:
    """The settings in :data:`SETTINGS` as Redis reports them; raises ``RedisError`` if it will not say."""
    found = client.config_get(*SETTINGS)
    return {text(name): text(value) for name, value in found.items()}


def findings(config: dict[str, str]) -> list[str]:
    """One sentence for each setting that puts acknowledged events at risk, or costs Redis CPU for
    nothing; empty when the configuration is as docs/deploy.md recommends."""
    found: list[str] = []
    aof = config.get("appendonly") == "yes"
    if not aof:
        found.append(
            "appendonly is not yes: the events this service answered 2xx since Redis's last snapshot are "
            "lost if Redis restarts. Set appendonly yes."
        )
    elif config.get("appendfsync") == "no":
        found.append(
            "appendfsync is no: the OS writes the AOF to disk when it chooses, so a host crash loses more "
            "than a second of acknowledged events. Set appendfsync everysec (or always)."
        )
    frequent = _frequent_save_points(config.get("save", ""))
    if aof and frequent:
        found.append(
            f"save points every {frequent} s or less beside the AOF: Redis snapshots its whole data set "
            'that often in a forked child, for nothing the AOF does not keep. Set save "" (or one point '
            f"of {RARE_SAVE_SECONDS} s or more)."
        )
    if aof and config.get("rdbcompression") == "yes":
        found.append(
            "rdbcompression is yes: each AOF rewrite compresses the whole data set and, its base that much "
            "smaller, comes about 2.8 times as often, for about three times the CPU of the rewrites with "
            "rdbcompression no. Set rdbcompression no."
        )
    percentage = config.get("auto-aof-rewrite-percentage", "")
    recommended = int(RECOMMENDED["auto-aof-rewrite-percentage"])
    if aof and percentage == "0":
        found.append(
            "auto-aof-rewrite-percentage is 0: Redis never rewrites the AOF by itself, so it grows until "
            f"a BGREWRITEAOF by hand and a restart replays all of it. Set auto-aof-rewrite-percentage {recommended}."
        )
    elif aof and percentage.isdigit() and int(percentage) < recommended:
        found.append(
            f"auto-aof-rewrite-percentage is {percentage}: each AOF rewrite copies the whole data set in a "
            f"forked child, and at {percentage} they come {recommended / int(percentage):.3g} times as often as at "
            f"{recommended}, for that much more CPU an event. Set auto-aof-rewrite-percentage {recommended}."
        )
    return found


def _frequent_save_points(save: str) -> int | None:
    """The shortest interval of ``save`` (pairs of seconds and changes) under :data:`RARE_SAVE_SECONDS`."""
    words = save.split()
    seconds = [int(w) for w in words[0::2] if w.isdigit()]
    frequent = [s for s in seconds if s < RARE_SAVE_SECONDS]
    return min(frequent) if frequent else None


def server_options() -> list[str]:
    """:data:`RECOMMENDED` as ``redis-server`` command-line options (``make run``'s and the benchmarks' Redis)."""
    return [part for name, value in RECOMMENDED.items() for part in (f"--{name}", value)]


def report(client: redis.Redis) -> list[str]:
    """The lines ``redis-setup`` prints about persistence (none when all is as recommended)."""
    try:
        config = read_settings(client)
    except redis.ResponseError as exc:  # a role's user, or a managed Redis that hides CONFIG
        names = f"{', '.join(SETTINGS[:-1])} and {SETTINGS[-1]}"
        return [f"could not read Redis's persistence settings ({type(exc).__name__}): check {names} against {WHERE}."]
    return [f"{line} ({WHERE})" for line in findings(config)]
