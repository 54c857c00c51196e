"""``redis-setup`` says which of Redis's persistence settings put acknowledged events at risk, or cost
Redis CPU for nothing, against docs/deploy.md ("Redis")."""

from __future__ import annotations

import pytest
import redis

from core.config import Settings
from core.redis import durability
from tests.procs import RedisServer, as_role
from tests.test_cli import run_cli

#: Redis's own defaults (no configuration file), and what docs/deploy.md recommends.
REDIS_DEFAULTS = {
    "appendonly": "no",
    "appendfsync": "everysec",
    "save": "3600 1 300 100 60 10000",
    "rdbcompression": "yes",
    "auto-aof-rewrite-percentage": "100",
}
RECOMMENDED = durability.RECOMMENDED


def said(config: dict[str, str]) -> list[str]:
    """The settings each finding names first."""
    return [line.split(" ", 1)[0] for line in durability.findings(config)]


def test_the_recommended_configuration_has_nothing_to_say():
    assert durability.findings(RECOMMENDED) == []
    assert durability.findings({**RECOMMENDED, "appendfsync": "always", "save": "3600 1"}) == []


def test_without_the_aof_only_the_aof_is_named():
    """Without AOF, the save points are the only persistence left: not the thing to remove first."""
    assert said(REDIS_DEFAULTS) == ["appendonly"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"appendfsync": "no"}, ["appendfsync"]),
        ({"save": "3600 1 300 100 60 10000"}, ["save"]),
        ({"save": "900 1"}, ["save"]),
        ({"rdbcompression": "yes"}, ["rdbcompression"]),
        ({"save": "3600 1 300 100", "rdbcompression": "yes"}, ["save", "rdbcompression"]),
        ({"auto-aof-rewrite-percentage": "100"}, ["auto-aof-rewrite-percentage"]),
        ({"auto-aof-rewrite-percentage": "0"}, ["auto-aof-rewrite-percentage"]),
        ({"auto-aof-rewrite-percentage": "400"}, []),
    ],
)
def test_each_setting_that_differs_is_named(change, named):
    assert said({**RECOMMENDED, **change}) == named


def test_a_lower_rewrite_percentage_is_told_how_much_more_often_it_rewrites():
    [line] = durability.findings({**RECOMMENDED, "auto-aof-rewrite-percentage": "100"})
    assert "come 2 times as often" in line
    [off] = durability.findings({**RECOMMENDED, "auto-aof-rewrite-percentage": "0"})
    assert "never rewrites" in off


def test_the_shortest_save_interval_is_the_one_given():
    [line] = durability.findings({**RECOMMENDED, "save": "3600 1 300 100 60 10000"})
    assert "every 60 s" in line


@pytest.mark.parametrize("save", ["junk", "60", "x 1 y 2", "-5 1", " "])
def test_a_save_value_redis_would_not_give_raises_nothing(save):
    """A value no Redis reports (read from a proxy, or a Redis of another kind) is read as far as it goes."""
    durability.findings({**RECOMMENDED, "save": save})


@pytest.mark.process
def test_redis_setup_warns_about_redis_s_defaults_and_not_about_the_recommended(tmp_path):
    """Against a Redis on its own defaults with AOF on, `redis-setup` loads the functions (exit 0) and
    warns about the save points, the compression and the rewrite percentage, each with where to read why; against the
    recommended configuration it says nothing more than what it loaded."""
    defaults = RedisServer(appendonly=True, options=("--save", REDIS_DEFAULTS["save"]))
    recommended = RedisServer(options=durability.server_options())  # as make run and the benchmarks start it
    try:
        defaults.start()
        recommended.start()
        warned = run_cli("redis-setup", env={"REDIS_URL": defaults.url}, cwd=tmp_path)
        assert warned.returncode == 0, warned.stderr
        assert "loaded" in warned.stdout
        warnings = [line for line in warned.stderr.splitlines() if line.startswith("warning: ")]
        assert [line.split(" ", 2)[1] for line in warnings] == ["save", "rdbcompression", "auto-aof-rewrite-percentage"]
        assert all(line.endswith('(docs/deploy.md, "Redis")') for line in warnings)
        quiet = run_cli("redis-setup", env={"REDIS_URL": recommended.url}, cwd=tmp_path)
        assert quiet.returncode == 0, quiet.stderr
        assert "warning" not in quiet.stderr
    finally:
        defaults.cleanup()
        recommended.cleanup()


@pytest.mark.process
def test_a_user_that_may_not_read_the_configuration_is_told_what_to_check():
    """A Redis that hides CONFIG (a managed one, or a user without it) gets one line naming the
    settings to check by hand, and no error."""
    server = RedisServer(appendonly=True)
    try:
        server.start()
        url = as_role(server.url, Settings.model_construct(), "worker")
        with redis.Redis.from_url(url) as client:
            [line] = durability.report(client)
        assert line.startswith("could not read Redis's persistence settings (NoPermissionError)")
        assert "rdbcompression" in line
    finally:
        server.cleanup()
