"""Smartcar's recommended alerts: the metrics they read, and the rules run through promtool.

Smartcar's webhook monitoring guide recommends alerting on signature failures (> 5 in 5 minutes),
processing errors (> 5 %), queue depth (> 1,000), response time (> 10 s) and VEHICLE_ERROR events
from over 10 % of vehicles. The chart's PrometheusRule carries all five; here ``promtool check
rules`` checks every rendered group, and ``promtool test rules`` feeds each new alert synthetic
series that stay at its threshold, then cross it. The distinct-vehicle counts behind the last one
come from Redis (core/redis/deployment_counts.py) and are checked against a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from redis.asyncio import Redis as AsyncRedis

from core import metrics
from core.config import Settings
from core.events.model import Vehicle, VehicleError, VehicleEvent
from core.redis.deployment_counts import BUCKET_SECONDS, WINDOW_SECONDS, DeploymentCounts, read_fleet
from core.redis.keys import fleet_key
from core.redis.queue_metrics import QueueCollector
from tests.procs import free_port, role_user
from tests.test_deploy import COMBINATIONS, ROOT, _merge, find, render

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed: `make tools` installs Debian's prometheus package, which ships it",
)
RECOMMENDED = (
    "SmartcarIngestSignatureFailures",
    "SmartcarIngestProcessingErrors",
    "SmartcarIngestQueueDeep",
    "SmartcarIngestResponseSlow",
    "SmartcarIngestVehicleErrorsWidespread",
)
NOW = float(int(time.time()))  # the fleet counts take the clock as an argument; keys expire by the real one


def _rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = find(render(values or COMBINATIONS["monitoring"]), "PrometheusRule")["spec"][
        "groups"
    ]
    return groups


def _by_alert(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# --- the rules ------------------------------------------------------------------------------------


def test_recommended_alerts_follow_their_values_and_name_a_runbook_section():
    """Each of the five alerts takes its threshold from values.yaml and links an anchor that docs/reliability.md has."""
    alerts = _by_alert(_rules())
    assert set(RECOMMENDED) <= alerts.keys()
    headings = re.findall(r"^#{2,4} (.+)$", (ROOT / "docs" / "reliability.md").read_text(), re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-") for heading in headings}
    for name in RECOMMENDED:
        url = alerts[name]["annotations"]["runbook_url"]
        assert url == f"docs/reliability.md#{name.lower()}", name
        assert name.lower() in anchors, name
    assert alerts["SmartcarIngestSignatureFailures"]["expr"].endswith("> 5")
    assert alerts["SmartcarIngestProcessingErrors"]["expr"].endswith("> 0.05")
    assert alerts["SmartcarIngestQueueDeep"]["expr"].endswith("> 1000")
    assert alerts["SmartcarIngestResponseSlow"]["expr"].endswith("> 10")
    assert "> 0.1\nand " in alerts["SmartcarIngestVehicleErrorsWidespread"]["expr"]
    tuned = {
        "signatureFailures": 20,
        "processingErrorRatio": 0.02,
        "queueDepth": 5000,
        "responseTimeSeconds": 5,
        "vehicleErrorRatio": 0.25,
        "vehicleErrorMinVehicles": 50,
        "runbookUrl": "https://docs.example.com/smartcar-ingest/reliability",
    }
    changed = _by_alert(_rules(_merge(COMBINATIONS["monitoring"], {"prometheusRule": tuned})))
    assert changed["SmartcarIngestSignatureFailures"]["expr"].endswith("> 20")
    assert changed["SmartcarIngestProcessingErrors"]["expr"].endswith("> 0.02")
    assert changed["SmartcarIngestProcessingErrors"]["annotations"]["summary"].startswith("More than 2% ")
    assert changed["SmartcarIngestQueueDeep"]["expr"].endswith("> 5000")
    assert changed["SmartcarIngestResponseSlow"]["expr"].endswith("> 5")
    assert changed["SmartcarIngestVehicleErrorsWidespread"]["expr"].endswith(">= 50")
    assert "> 0.25\nand " in changed["SmartcarIngestVehicleErrorsWidespread"]["expr"]
    assert changed["SmartcarIngestQueueDeep"]["annotations"]["runbook_url"] == (
        "https://docs.example.com/smartcar-ingest/reliability#smartcaringestqueuedeep"
    )


def test_every_alert_links_its_runbook_section():
    """Each alert of the rule file, not only Smartcar's five, links a section docs/reliability.md has."""
    alerts = _by_alert(_rules())
    headings = re.findall(r"^#{2,4} (.+)$", (ROOT / "docs" / "reliability.md").read_text(), re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-") for heading in headings}
    assert len(alerts) == 17
    for name, rule in alerts.items():
        assert rule["annotations"].get("runbook_url") == f"docs/reliability.md#{name.lower()}", name
        assert name.lower() in anchors, name


def test_no_alert_labels_by_vehicle_or_event():
    """No rule groups or filters by a vehicle, user or event id: every label stays bounded."""
    for rule in _by_alert(_rules()).values():
        assert not re.search(r"vehicle_id|user_id|event_id|vehicleId|eventId", rule["expr"]), rule["alert"]


@pytest.mark.process
@needs_promtool
def test_every_rule_group_passes_promtool_check(tmp_path: Path):
    """`promtool check rules` accepts every rendered group (the existing alerts and the five new ones)."""
    groups = _rules()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    result = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(group["rules"]) for group in groups)
    assert f"SUCCESS: {count} rules found" in result.stdout


def _labels(name: str, severity: str) -> dict[str, str]:
    return {"alertname": name, "severity": severity, "team": "fleet"}


def _annotations(alerts: dict[str, dict[str, Any]], name: str, description: str) -> dict[str, str]:
    """The alert's annotations as rendered, with its description as promtool expands it."""
    return {**alerts[name]["annotations"], "description": description}


def _unit_tests(alerts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per alert: series at the threshold for a while (no alert), then past it (the alert fires)."""
    ns = 'namespace="smartcar"'
    bucket = f'smartcar_ingest_webhook_request_seconds_bucket{{{ns},pod="web-1",'
    return [
        {  # 5 failed signatures in 5 minutes is the threshold; 15 is past it. Other outcomes do not count.
            "interval": "1m",
            "input_series": [
                {
                    "series": f'smartcar_ingest_deliveries_total{{{ns},pod="web-1",outcome="rejected_invalid_signature"}}',
                    "values": "0+1x20 20+3x20",
                },
                {
                    "series": f'smartcar_ingest_deliveries_total{{{ns},pod="web-1",outcome="accepted"}}',
                    "values": "0+500x40",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "SmartcarIngestSignatureFailures", "exp_alerts": []},
                {
                    "eval_time": "35m",
                    "alertname": "SmartcarIngestSignatureFailures",
                    "exp_alerts": [
                        {
                            "exp_labels": _labels("SmartcarIngestSignatureFailures", "warning"),
                            "exp_annotations": _annotations(
                                alerts,
                                "SmartcarIngestSignatureFailures",
                                "15 deliveries were answered 401 invalid_signature in 5 minutes: the management "
                                "token is wrong or mid-rotation, or someone is posting forged deliveries.",
                            ),
                        }
                    ],
                },
            ],
        },
        {  # 2 errors per 102 finished jobs (2 %), then 10 per 110 (9 %); retried attempts are left out.
            "interval": "1m",
            "input_series": [
                {"series": f'smartcar_ingest_jobs_total{{{ns},pod="w-1",outcome="published"}}', "values": "0+100x60"},
                {
                    "series": f'smartcar_ingest_jobs_total{{{ns},pod="w-1",outcome="error"}}',
                    "values": "0+2x30 60+10x30",
                },
                {
                    "series": f'smartcar_ingest_jobs_total{{{ns},pod="w-1",outcome="parked_unknown_user"}}',
                    "values": "0x60",
                },
                {"series": f'smartcar_ingest_jobs_total{{{ns},pod="w-1",outcome="retried"}}', "values": "0+1000x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "29m", "alertname": "SmartcarIngestProcessingErrors", "exp_alerts": []},
                {
                    "eval_time": "55m",
                    "alertname": "SmartcarIngestProcessingErrors",
                    "exp_alerts": [
                        {
                            "exp_labels": _labels("SmartcarIngestProcessingErrors", "warning"),
                            "exp_annotations": _annotations(
                                alerts,
                                "SmartcarIngestProcessingErrors",
                                "9.091% of the jobs that finished in 10 minutes raised an error or were parked. "
                                "smartcar-ingest status shows the parked reasons; the worker logs show the errors.",
                            ),
                        }
                    ],
                },
            ],
        },
        {  # 1,000 waiting is the threshold; 1,500 for 5 minutes is past it. Every pod reports the same depth.
            "interval": "1m",
            "input_series": [
                {
                    "series": f'smartcar_ingest_queue_depth{{{ns},pod="{pod}",queue="smartcar-events"}}',
                    "values": "1000x20 1500x20",
                }
                for pod in ("web-1", "w-1")
            ],
            "alert_rule_test": [
                {"eval_time": "19m", "alertname": "SmartcarIngestQueueDeep", "exp_alerts": []},
                {"eval_time": "23m", "alertname": "SmartcarIngestQueueDeep", "exp_alerts": []},  # not yet 5 minutes
                {
                    "eval_time": "30m",
                    "alertname": "SmartcarIngestQueueDeep",
                    "exp_alerts": [
                        {
                            "exp_labels": _labels("SmartcarIngestQueueDeep", "warning"),
                            "exp_annotations": _annotations(
                                alerts,
                                "SmartcarIngestQueueDeep",
                                "1.5k jobs have been waiting for 5 minutes: the workers are too few, stopped, or "
                                "held back by Smartcar's rate limits.",
                            ),
                        }
                    ],
                },
            ],
        },
        {  # 100 answers a minute, all under 0.5 s; then 5 of them take 10-15 s (p99 about 14 s).
            "interval": "1m",
            "input_series": [
                {"series": bucket + f'le="{le}"}}', "values": f"0+100x20 2000+{fast}x20"}
                for le, fast in (("0.5", 95), ("1.0", 95), ("2.5", 95), ("5.0", 95), ("10.0", 95))
            ]
            + [{"series": bucket + f'le="{le}"}}', "values": "0+100x40"} for le in ("15.0", "+Inf")],
            "alert_rule_test": [
                {"eval_time": "19m", "alertname": "SmartcarIngestResponseSlow", "exp_alerts": []},
                {
                    "eval_time": "35m",
                    "alertname": "SmartcarIngestResponseSlow",
                    "exp_alerts": [
                        {
                            "exp_labels": _labels("SmartcarIngestResponseSlow", "critical"),
                            "exp_annotations": _annotations(
                                alerts,
                                "SmartcarIngestResponseSlow",
                                "The 99th percentile of webhook answer time is 14s; Smartcar fails a delivery "
                                "not answered within 15 s and drops it after 4 attempts.",
                            ),
                        }
                    ],
                },
            ],
        },
        {  # 10 of 100 vehicles in error is the threshold; 11 for 15 minutes is past it.
            "interval": "1m",
            "input_series": [
                {"series": f'smartcar_ingest_vehicles_active{{{ns},pod="w-1"}}', "values": "100x60"},
                {"series": f'smartcar_ingest_vehicles_in_error{{{ns},pod="w-1"}}', "values": "10x30 11x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "29m", "alertname": "SmartcarIngestVehicleErrorsWidespread", "exp_alerts": []},
                {"eval_time": "40m", "alertname": "SmartcarIngestVehicleErrorsWidespread", "exp_alerts": []},
                {
                    "eval_time": "50m",
                    "alertname": "SmartcarIngestVehicleErrorsWidespread",
                    "exp_alerts": [
                        {
                            "exp_labels": _labels("SmartcarIngestVehicleErrorsWidespread", "warning"),
                            "exp_annotations": _annotations(
                                alerts,
                                "SmartcarIngestVehicleErrorsWidespread",
                                "11% of the vehicles that sent events in the last hour sent a VEHICLE_ERROR with "
                                "an open error: look for a common make, error type or code (a brand outage, "
                                "expired permissions, a subscription lapse).",
                            ),
                        }
                    ],
                },
            ],
        },
        {  # 3 of 5 vehicles in error: past the ratio, but too few vehicles to page anyone.
            "interval": "1m",
            "input_series": [
                {"series": f'smartcar_ingest_vehicles_active{{{ns},pod="w-1"}}', "values": "5x60"},
                {"series": f'smartcar_ingest_vehicles_in_error{{{ns},pod="w-1"}}', "values": "3x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "50m", "alertname": "SmartcarIngestVehicleErrorsWidespread", "exp_alerts": []}
            ],
        },
    ]


def _refusal_tests(alerts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every 503 the webhook answers counts as a failed delivery, whichever its outcome label."""
    ns = 'namespace="smartcar"'
    tests = []
    for outcome in ("unavailable", "spool_full", "internal_error"):
        tests.append(
            {  # silent for 10 minutes, then one 503 a minute: 5 in 5 minutes, past the 3 of the rule
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'smartcar_ingest_deliveries_total{{{ns},pod="web-1",outcome="{outcome}"}}',
                        "values": "0x10 0+1x10",
                    },
                    {
                        "series": f'smartcar_ingest_deliveries_total{{{ns},pod="web-1",outcome="accepted"}}',
                        "values": "0+100x20",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "9m", "alertname": "SmartcarIngestWebhookFailing", "exp_alerts": []},
                    {
                        "eval_time": "18m",
                        "alertname": "SmartcarIngestWebhookFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": _labels("SmartcarIngestWebhookFailing", "critical"),
                                "exp_annotations": _annotations(
                                    alerts,
                                    "SmartcarIngestWebhookFailing",
                                    "5 deliveries were answered 503 in 5 minutes. Smartcar retries each 3 times "
                                    "over about 3 minutes, then drops it.",
                                ),
                            }
                        ],
                    },
                ],
            }
        )
    return tests


@pytest.mark.process
@needs_promtool
def test_every_503_the_webhook_answers_counts_as_a_failed_delivery(tmp_path: Path):
    """`promtool test rules`: 503s for Redis, a full spool or a bug each fire SmartcarIngestWebhookFailing."""
    groups = _rules()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": _refusal_tests(_by_alert(groups))}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, width=1000))
    result = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
@needs_promtool
def test_a_spool_file_kept_for_ten_minutes_fires_its_alert(tmp_path: Path):
    """`promtool test rules`: no alert while the gauge is 0, nor for a file kept under 10 minutes;
    one, naming the pod, once a file has been kept for 10."""
    groups = _rules()
    alerts = _by_alert(groups)
    name = "SmartcarIngestSpoolFileStuck"
    series = 'smartcar_ingest_spool_failed_files{namespace="smartcar",pod="web-1"}'
    fired = {
        "exp_labels": {**_labels(name, "warning"), "pod": "web-1"},
        "exp_annotations": _annotations(
            alerts,
            name,
            "web-1 has kept 2 spool file(s) undrained for 10 minutes, for a reason other than Redis (the disk "
            "refuses them, or a fault of ours). Their deliveries were answered 202 and are not in Redis yet.",
        ),
    }
    test = {
        "interval": "1m",
        # none for 10 minutes, one kept 6 minutes then drained, none, then two kept from the 23rd minute
        "input_series": [{"series": series, "values": "0x10 1x5 0x5 2x20"}],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": name, "exp_alerts": []},
            {"eval_time": "30m", "alertname": name, "exp_alerts": []},
            {"eval_time": "34m", "alertname": name, "exp_alerts": [fired]},
        ],
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [test]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, width=1000))
    result = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
@needs_promtool
def test_recommended_alerts_fire_past_their_thresholds_and_not_at_them(tmp_path: Path):
    """`promtool test rules`: each new alert stays silent at its threshold and fires once past it (for its `for`)."""
    groups = _rules()
    alerts = _by_alert(groups)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": _unit_tests(alerts)}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, width=1000))
    result = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.process
@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path):
    """The same unit tests fail when an alert's threshold is raised past the series (promtool is not vacuous)."""
    groups = _rules(_merge(COMBINATIONS["monitoring"], {"prometheusRule": {"queueDepth": 2000}}))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": _unit_tests(_by_alert(_rules()))}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, width=1000))
    result = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "SmartcarIngestQueueDeep" in result.stdout + result.stderr


def test_grafana_dashboard_draws_each_recommended_alert_with_its_threshold():
    """The dashboard's row of Smartcar's recommended alerts has a panel per alert, its threshold as a red line."""
    dashboard = json.loads((ROOT / "helm" / "smartcar-ingest" / "dashboards" / "smartcar-ingest.json").read_text())
    panels = dashboard["panels"]
    row = next(i for i, panel in enumerate(panels) if panel["type"] == "row" and "recommended" in panel["title"])
    mine = panels[row + 1 : row + 6]
    thresholds = {
        "SmartcarIngestSignatureFailures": 5,
        "SmartcarIngestProcessingErrors": 0.05,
        "SmartcarIngestQueueDeep": 1000,
        "SmartcarIngestResponseSlow": 10,
        "SmartcarIngestVehicleErrorsWidespread": 0.1,
    }
    for panel, (alert, threshold) in zip(mine, thresholds.items(), strict=True):
        assert alert in panel["description"], panel["title"]
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["thresholds"]["steps"][-1] == {"color": "red", "value": threshold}, panel["title"]
        assert defaults["custom"]["thresholdsStyle"] == {"mode": "line"}, panel["title"]
        assert panel["gridPos"]["y"] == panels[row]["gridPos"]["y"] + 1
    assert sum(panel["gridPos"]["w"] for panel in mine) == 24
    assert "smartcar_ingest_vehicles_in_error" in mine[-1]["targets"][0]["expr"]


# --- the metrics behind them ----------------------------------------------------------------------


def test_webhook_latency_histogram_resolves_smartcars_10_second_threshold():
    """The answer-time histogram has buckets at 5, 10 and 15 s, so a p99 over 10 s is visible, not capped at 2.5 s."""
    [family] = metrics.REQUEST_SECONDS.collect()
    bounds = {sample.labels["le"] for sample in family.samples if sample.name.endswith("_bucket")}
    assert {"5.0", "10.0", "15.0", "+Inf"} <= bounds


def _event(vehicle: str, event_type: str = "VEHICLE_STATE", *states: str | None) -> VehicleEvent:
    return VehicleEvent(
        event_id=f"{vehicle}-{event_type}-{len(states)}",
        event_type=event_type,  # type: ignore[arg-type]
        smartcar_user_id="user-1",
        vehicle=Vehicle(id=vehicle),
        errors=tuple(VehicleError(type="VEHICLE_STATE", code="UNREACHABLE", state=state) for state in states),
    )


def _note(redis_url: str, events: list[tuple[VehicleEvent, float]]) -> None:
    async def run() -> None:
        client = AsyncRedis.from_url(redis_url)
        try:
            counts = DeploymentCounts(client)
            for event, at in events:
                counts.saw(event, now=at)
            await counts.aclose()
        finally:
            await client.aclose()

    asyncio.run(run())


def test_fleet_counts_distinct_vehicles_and_those_reporting_an_open_error(redis_url, redis_client):
    """Three vehicles, one with an open VEHICLE_ERROR (twice), one whose error is RESOLVED: 3 active, 1 in error."""
    _note(
        redis_url,
        [
            (_event("veh-a"), NOW),
            (_event("veh-b"), NOW + 1),
            (_event("veh-a", "VEHICLE_ERROR", "ERROR"), NOW + 2),
            (_event("veh-a", "VEHICLE_ERROR", "ERROR", "ERROR"), NOW + 3),
            (_event("veh-c", "VEHICLE_ERROR", "RESOLVED"), NOW + 4),
        ],
    )
    assert read_fleet(redis_client, now=NOW + 5) == (3, 1)  # active, in error
    # A VEHICLE_ERROR that lists an open error beside a resolved one counts; so does one listing none.
    _note(
        redis_url,
        [(_event("veh-c", "VEHICLE_ERROR", "RESOLVED", "ERROR"), NOW + 6), (_event("veh-d", "VEHICLE_ERROR"), NOW + 7)],
    )
    assert read_fleet(redis_client, now=NOW + 8) == (4, 3)


def test_fleet_counts_cover_the_last_hour_and_the_keys_expire(redis_url, redis_client):
    """A vehicle seen now still counts 59 minutes on, no longer 71 minutes on; its buckets expire by then."""
    _note(redis_url, [(_event("veh-a", "VEHICLE_ERROR", "ERROR"), NOW)])
    assert read_fleet(redis_client, now=NOW + WINDOW_SECONDS - 60) == (1, 1)
    assert read_fleet(redis_client, now=NOW + WINDOW_SECONDS + BUCKET_SECONDS + 60) == (0, 0)
    bucket = int(NOW // BUCKET_SECONDS)
    for kind in ("active", "errors"):
        expires = redis_client.expiretime(fleet_key(kind, bucket))
        assert expires == (bucket + 1) * BUCKET_SECONDS + WINDOW_SECONDS, kind


def test_fleet_gauges_reach_metrics_without_a_vehicle_id(redis_url, redis_client):
    """/metrics' collector exports smartcar_ingest_vehicles_active and _in_error, with no label naming a vehicle."""
    _note(
        redis_url,
        [(_event("veh-secret-1"), time.time()), (_event("veh-secret-2", "VEHICLE_ERROR", "ERROR"), time.time())],
    )
    registry = CollectorRegistry()
    settings = Settings(_env_file=None, redis_url=redis_url)  # type: ignore[call-arg]
    collector = QueueCollector(settings)
    registry.register(collector)
    try:
        text = generate_latest(registry).decode()
    finally:
        collector.close()
    assert "\nsmartcar_ingest_vehicles_active 2.0\n" in text
    assert "\nsmartcar_ingest_vehicles_in_error 1.0\n" in text
    assert "veh-secret" not in text


def test_a_redis_failure_never_fails_the_job():
    """Counting is a statistic: with Redis unreachable, the write logs and returns instead of raising."""
    _note(f"redis://127.0.0.1:{free_port()}/0", [(_event("veh-a"), NOW)])


def test_workers_count_the_fleet_and_the_web_user_leaves_it_to_them(redis_url, redis_client):
    """Under their ACLs the workers' user writes and counts the fleet keys; the web's may not, and its
    /metrics then exports the other gauges without the fleet's (the workers export those)."""
    settings = Settings(_env_file=None, redis_url=redis_url)  # type: ignore[call-arg]
    with role_user(redis_url, settings, "worker") as worker_url, role_user(redis_url, settings, "web") as web_url:
        _note(worker_url, [(_event("veh-a", "VEHICLE_ERROR", "ERROR"), time.time())])
        with redis.Redis.from_url(worker_url) as worker:
            assert read_fleet(worker)[1] == 1  # in error
        with redis.Redis.from_url(web_url) as web, pytest.raises(redis.exceptions.NoPermissionError):
            read_fleet(web)
        registry = CollectorRegistry()
        collector = QueueCollector(settings.model_copy(update={"redis_url": web_url}))
        registry.register(collector)
        try:
            assert registry.get_sample_value("smartcar_ingest_redis_up") == 1
            assert registry.get_sample_value("smartcar_ingest_vehicles_active") is None
        finally:
            collector.close()
