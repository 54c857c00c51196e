"""The deployable artefacts, checked offline: the Dockerfile and the Helm chart.

The chart is rendered by Helm's own engine (``helm-python-sdk`` binds Helm's Go SDK, so no ``helm``
binary or cluster is involved) under its defaults and under the value combinations operators use.
Every rendered object is validated against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships, for the oldest Kubernetes the chart supports and the newest the
package knows; KEDA and Prometheus Operator objects, whose CRDs it does not ship, are validated
against the structural schemas below. ``hadolint`` lints the Dockerfile, since no Docker engine runs
here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "smartcar-ingest"
RELEASE = "ingest"
NAMESPACE = "smartcar"

# The chart's kubeVersion floor and the newest Kubernetes whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.29", kubernetes_validate.latest_version())

# Recognisable fake secrets: none may appear anywhere but a Secret.
SECRETS = {
    "redisUrl": "redis://:redis-pass-3f9a@redis-master:6379/0",
    "databaseUrl": "postgresql://ingest:pg-pass-8c1e@postgres:5432/smartcar",
    "smartcarManagementToken": "mgmt-token-5d2b",
    "smartcarClientSecret": "client-secret-a47c",
    "connectStateSecret": "state-secret-91fe",
}
# Each role's own Redis ACL user.
ROLE_REDIS = {
    "webRedisUrl": "redis://web:web-pass-61d0@redis-master:6379/0",
    "workerRedisUrl": "redis://worker:worker-pass-0b7e@redis-master:6379/0",
}
SECRET_ENV = {
    "REDIS_URL",
    "DATABASE_URL",
    "SMARTCAR_MANAGEMENT_TOKEN",
    "SMARTCAR_CLIENT_SECRET",
    "CONNECT_STATE_SECRET",
}

# The smallest values an install accepts: the secrets and the client id.
INSTALL: dict[str, Any] = {"secrets": SECRETS, "config": {"SMARTCAR_CLIENT_ID": "client-id-e01"}}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


KEDA = {
    "worker": {
        "autoscaling": {
            "keda": {
                "enabled": True,
                "redis": {"address": "redis-master:6379"},
                "auth": {"secretName": "redis", "passwordKey": "redis-password"},
            }
        }
    }
}
INGRESS = {
    "webhook": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "tls": [{"secretName": "smartcar-ingest-tls", "hosts": ["smartcar-ingest.example.com"]}],
        }
    }
}
EXISTING_SECRET = {"secrets": {"existingSecret": "smartcar-ingest-secrets"}, "config": INSTALL["config"]}
# Connect served by the web, each role logging in to Redis as its own user.
CONNECT = {"connect": {"enabled": True}, "secrets": ROLE_REDIS}
MONITORING = {
    "webhook": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "worker": {"podMonitor": {"enabled": True}},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Smartcar"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}, "alertLabels": {"team": "fleet"}},
}
# rq-dashboard, behind an authenticating proxy (the only pods its NetworkPolicy admits), with basic auth too.
PROXY_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "oauth2-proxy"}}}
DASHBOARD = {
    "dashboard": {
        "enabled": True,
        "basicAuth": {"secretName": "rq-dashboard-auth"},
        "networkPolicy": {"from": [PROXY_PEER]},
    }
}
FIXED_SIZE = {
    "webhook": {"autoscaling": {"enabled": False}, "podDisruptionBudget": {"minAvailable": 1}},
    "worker": {"autoscaling": {"enabled": False}, "concurrency": 4},
    "serviceAccount": {"create": False, "name": "smartcar"},
    "migrations": {"enabled": False},
}

COMBINATIONS: dict[str, dict[str, Any]] = {
    "defaults": INSTALL,
    "keda": _merge(INSTALL, KEDA),
    "ingress": _merge(INSTALL, INGRESS),
    "existing-secret": EXISTING_SECRET,
    "monitoring": _merge(INSTALL, MONITORING),
    "fixed-size": _merge(INSTALL, FIXED_SIZE),
    "connect": _merge(INSTALL, CONNECT),
    "dashboard": _merge(INSTALL, DASHBOARD),
    "everything": _merge(
        _merge(_merge(_merge(_merge(EXISTING_SECRET, KEDA), INGRESS), MONITORING), DASHBOARD),
        {"connect": {"enabled": True}},
    ),
}

# What each combination renders, as "Kind/name-suffix" (the name after the "ingest-smartcar-ingest" prefix).
COMMON = {
    "ConfigMap/",
    "Deployment/-webhook",
    "Deployment/-worker",
    "Service/-webhook",
    "PodDisruptionBudget/-webhook",
    "PodDisruptionBudget/-worker",
    "ServiceAccount/",
    "Job/-migrations",
    "NetworkPolicy/-webhook",
    "NetworkPolicy/-worker",
}
CHART_SECRETS = {"Secret/", "Secret/-migrations"}
HPAS = {"HorizontalPodAutoscaler/-webhook", "HorizontalPodAutoscaler/-worker"}
RQ_DASHBOARD = {"Deployment/-rq-dashboard", "Service/-rq-dashboard", "NetworkPolicy/-rq-dashboard"}
EXPECTED_OBJECTS = {
    "defaults": COMMON | CHART_SECRETS | HPAS,
    "keda": COMMON
    | CHART_SECRETS
    | {"HorizontalPodAutoscaler/-webhook", "ScaledObject/-worker", "TriggerAuthentication/-worker"},
    "ingress": COMMON | CHART_SECRETS | HPAS | {"Ingress/-webhook"},
    "existing-secret": COMMON | HPAS,
    "monitoring": COMMON
    | CHART_SECRETS
    | HPAS
    | {
        "ServiceMonitor/-webhook",
        "Service/-webhook-admin",
        "PodMonitor/-worker",
        "ConfigMap/-dashboard",
        "PrometheusRule/",
    },
    "fixed-size": (COMMON - {"ServiceAccount/", "Job/-migrations"}) | {"Secret/"},
    "connect": COMMON | CHART_SECRETS | HPAS,
    "dashboard": COMMON | CHART_SECRETS | HPAS | RQ_DASHBOARD,
    "everything": COMMON
    | RQ_DASHBOARD
    | {
        "HorizontalPodAutoscaler/-webhook",
        "ScaledObject/-worker",
        "TriggerAuthentication/-worker",
        "Ingress/-webhook",
        "ServiceMonitor/-webhook",
        "Service/-webhook-admin",
        "PodMonitor/-worker",
        "ConfigMap/-dashboard",
        "PrometheusRule/",
    },
}

# Structural schemas for the custom resources kubernetes-validate has no schema for: the fields
# this chart uses, typed as the CRDs type them (KEDA's trigger metadata is a map of strings).
STRING = {"type": "string"}
INTEGER = {"type": "integer"}
STRING_MAP = {"type": "object", "additionalProperties": STRING}
DURATION = {"type": "string", "pattern": r"^(0|([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": STRING_MAP},
    "required": ["matchLabels"],
}


def _custom_resource(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": STRING,
            "kind": STRING,
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": STRING, "labels": STRING_MAP, "annotations": STRING_MAP},
            },
            "spec": spec,
        },
    }


def _closed(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": required}


CUSTOM_RESOURCE_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): _custom_resource(
        _closed(
            {
                "scaleTargetRef": _closed({"name": STRING, "apiVersion": STRING, "kind": STRING}, ["name"]),
                "pollingInterval": INTEGER,
                "cooldownPeriod": INTEGER,
                "minReplicaCount": INTEGER,
                "maxReplicaCount": INTEGER,
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "type": {"enum": ["redis"]},
                            "metadata": _closed(
                                {
                                    "address": {"type": "string", "pattern": r"^[^:/\s]+:[0-9]+$"},
                                    "listName": STRING,
                                    "listLength": {"type": "string", "pattern": "^[0-9]+$"},
                                    "activationListLength": {"type": "string", "pattern": "^[0-9]+$"},
                                    "databaseIndex": {"type": "string", "pattern": "^[0-9]+$"},
                                    "enableTLS": {"enum": ["true", "false"]},
                                },
                                ["address", "listName", "listLength"],
                            ),
                            "authenticationRef": _closed({"name": STRING}, ["name"]),
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        )
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _custom_resource(
        _closed(
            {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {"parameter": {"enum": ["password", "username"]}, "name": STRING, "key": STRING},
                        ["parameter", "name", "key"],
                    ),
                }
            },
            ["secretTargetRef"],
        )
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _custom_resource(
        _closed(
            {
                "selector": LABEL_SELECTOR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {"port": STRING, "path": STRING, "interval": DURATION, "scrapeTimeout": DURATION}, ["port"]
                    ),
                },
            },
            ["selector", "endpoints"],
        )
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _custom_resource(
        _closed(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "name": STRING,
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": _closed(
                                    {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                        "record": STRING,
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": DURATION,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                    ["expr"],
                                ),
                            },
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        )
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _custom_resource(
        _closed(
            {
                "selector": LABEL_SELECTOR,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {"port": STRING, "path": STRING, "interval": DURATION, "scrapeTimeout": DURATION}, ["port"]
                    ),
                },
            },
            ["selector", "podMetricsEndpoints"],
        )
    ),
}

# An object name: a DNS label of at most 63 characters.
DNS_LABEL = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def render(values: dict[str, Any] | None = None, *, release: str = RELEASE) -> list[dict[str, Any]]:
    """Render the chart as ``helm install`` would and return its Kubernetes objects."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            for document in yaml.safe_load_all(text):
                if document:
                    document["__source__"] = path
                    objects.append(document)
    return objects


def manifest(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key != "__source__"}


def find(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    name = f"{RELEASE}-smartcar-ingest{suffix}"
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{obj['kind']}/{obj['metadata']['name']}": obj["spec"]["template"]["spec"]
        for obj in objects
        if obj["kind"] in {"Deployment", "Job"}
    }


def container(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    containers = find(objects, "Deployment", f"-{component}")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_names(spec: dict[str, Any]) -> set[str]:
    return {entry["name"] for entry in spec.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in COMBINATIONS.items()}


# --- Dockerfile ---------------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.dashboard"])
def test_dockerfile_passes_hadolint_without_findings(dockerfile):
    """hadolint reports nothing for the Dockerfiles, not even style or info findings."""
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--format", "json", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_dockerfile_builds_dependencies_before_source_and_runs_as_a_numeric_user():
    """The lock-file layer precedes the source; the slim runtime gets the venv, a numeric USER and exec-form CMD."""
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [line for line in instructions if line and not line.startswith("#")]
    stages = [i for i, line in enumerate(instructions) if line.startswith("FROM ")]
    assert len(stages) >= 3, "uv, build and runtime stages"
    deps = next(i for i, line in enumerate(instructions) if "--no-install-project" in line)
    source = next(i for i, line in enumerate(instructions) if line.startswith("COPY . "))
    for flag in ("uv.lock", "--frozen", "--no-dev"):
        assert flag in instructions[deps]
    assert deps < source
    runtime = instructions[stages[-1] :]
    assert instructions[stages[-1]].startswith("FROM ${PYTHON_IMAGE}")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    copies = [line for line in runtime if line.startswith("COPY ")]
    assert copies == ["COPY --from=build /app/.venv /app/.venv"]
    user = next(line for line in runtime if line.startswith("USER "))
    assert re.fullmatch(r"USER 10001(:10001)?", user)
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    cmd = next(line for line in runtime if line.startswith("CMD "))
    assert json.loads(cmd.removeprefix("CMD ")) == ["smartcar-ingest", "web", "--host", "0.0.0.0", "--port", "8000"]


def test_dashboard_image_installs_rq_dashboard_from_the_lock_and_nothing_of_the_service():
    """Dockerfile.dashboard pins rq-dashboard's dependencies (RQ included) to uv.lock, copies no source, runs as 10001."""
    text = (ROOT / "Dockerfile.dashboard").read_text()
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [line for line in instructions if line and not line.startswith("#")]
    install = next(line for line in instructions if "uv pip install" in line)
    assert "source=uv.lock" in install
    assert "uv export --frozen --all-groups" in install
    assert "--constraint" in install
    assert not [line for line in instructions if line.startswith(("COPY . ", "ADD "))]
    runtime = instructions[max(i for i, line in enumerate(instructions) if line.startswith("FROM ")) :]
    assert [line for line in runtime if line.startswith("COPY ")] == ["COPY --from=build /app/.venv /app/.venv"]
    assert next(line for line in runtime if line.startswith("USER ")) == "USER 10001:10001"
    cmd = json.loads(next(line for line in runtime if line.startswith("CMD ")).removeprefix("CMD "))
    assert cmd[0] == "rq-dashboard"
    assert {"--json", "--disable-delete"} <= set(cmd)


def test_dockerignore_admits_only_what_the_image_is_built_from():
    """The build context is an allowlist, so .env files, the venv and databases never reach a layer."""
    lines = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in {"", "#"}
    ]
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    # Everything the wheel is built from: its packages and the folders it force-includes (schemas/).
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", "uv.lock", "README.md", *wheel["packages"], *wheel.get("force-include", {})}
    assert needed <= admitted, sorted(needed - admitted)
    assert not admitted & {".env", ".venv", "tests", ".git", "emulator"}


# --- The wheel (what the image installs) ---------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built by `uv build --wheel` from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    uv = shutil.which("uv")
    assert uv is not None, "uv is not on PATH"
    result = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("*.whl")
    return path


@pytest.mark.process
def test_wheel_ships_the_service_without_the_emulator_or_the_tests(wheel):
    """The wheel holds core, service, workers and migrations, and not one file of emulator/ or tests/."""
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {name for name in top if not name.endswith(".dist-info")} == {
        "cli",
        "core",
        "service",
        "workers",
        "migrations",
    }
    assert not [name for name in names if name.startswith(("emulator/", "tests/"))]
    assert {"cli/main.py", "service/server.py", "migrations/env.py"} <= set(names)
    # The JSON Schemas ship inside core, byte for byte as in schemas/ (core.schemas loads them).
    with zipfile.ZipFile(wheel) as archive:
        for source in sorted((ROOT / "schemas").glob("*.schema.json")):
            assert archive.read(f"core/schema_files/{source.name}") == source.read_bytes(), source.name


# Loads every schema through core.schemas from an unpacked wheel, with the checkout off sys.path.
_SCHEMAS_FROM_WHEEL = """
import json, sys
from pathlib import Path
root, site = sys.argv[1:]
sys.path[:] = [site] + [p for p in sys.path if p and Path(p).resolve() != Path(root)]
from core import schemas
assert schemas.__file__.startswith(site), schemas.__file__
assert str(schemas.schema_folder()).startswith(site), schemas.schema_folder()
print(json.dumps({name: schema["$id"] for name, schema in schemas.load_all().items()}))
"""


@pytest.mark.process
def test_the_installed_package_loads_every_json_schema(wheel, tmp_path):
    """Installed from the wheel alone, core.schemas finds and loads every schema of schemas/."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    result = subprocess.run(
        [sys.executable, "-c", _SCHEMAS_FROM_WHEEL, str(ROOT), str(site)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert sorted(f"{name}.schema.json" for name in loaded) == sorted(p.name for p in (ROOT / "schemas").iterdir())
    assert all(schema_id.endswith(f"/{name}.schema.json") for name, schema_id in loaded.items())


# Runs the console script from an unpacked wheel, with the checkout taken off sys.path.
_FROM_WHEEL = """
import sys
from pathlib import Path
root, site, *argv = sys.argv[1:]
sys.path[:] = [site] + [p for p in sys.path if p and Path(p).resolve() != Path(root)]
import service
assert service.__file__.startswith(site), service.__file__
from cli.main import main
sys.exit(main(argv))
"""


@pytest.mark.process
@pytest.mark.parametrize("command", [["emulator"], ["dev"]])
def test_cli_from_the_wheel_says_in_one_line_that_the_emulator_is_absent(wheel, tmp_path, redis_url, command):
    """Installed from the wheel, `emulator` and `dev` (no Smartcar credentials) exit 2 with one line naming the emulator."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "REDIS_", "PYTHONPATH"))}
    # Its own session, killed whole afterwards: should `dev` wrongly start, its emulator, web and
    # worker must not outlive the test and take other tests' jobs from the shared Redis.
    proc = subprocess.Popen(
        [sys.executable, "-c", _FROM_WHEEL, str(ROOT), str(site), *command, "--port", str(free_port())],
        env=env | {"REDIS_URL": redis_url},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    assert proc.returncode == 2, stdout + stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"smartcar-ingest {command[0]}: the Smartcar emulator is not installed"), line


# --- Chart: lint, schema, render --------------------------------------------------------------------


@pytest.mark.parametrize("combination", ["chart-defaults", *COMBINATIONS])
def test_chart_lints_strictly(combination):
    """`helm lint --strict` finds no warning or error, for the bare defaults and every combination."""
    values = None if combination == "chart-defaults" else COMBINATIONS[combination]
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems, (version, problems)
        assert not report["errors"], (version, report["errors"])


def test_values_schema_rejects_typos_and_secrets_in_the_configmap():
    """values.schema.json refuses unknown keys, secrets, DEV_MODE and chart-set ports under `config`, non-public Ingress paths."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(COMBINATIONS["everything"])
        for bad in (
            {"webhook": {"replicacount": 3}},
            {"config": {"DATABASE_URL": SECRETS["databaseUrl"]}},
            {"config": {"SMARTCAR_MANAGEMENT_TOKEN": "leaked"}},
            {"config": {"CONNECT_STATE_SECRET": "leaked"}},
            {"config": {"SMARTCAR_CLIENT_SECRET": "leaked"}},
            {"config": {"PGPASSWORD": "leaked"}},
            {"config": {"DEV_MODE": "true"}},
            {"config": {"ADMIN_PORT": 8000}},
            {"secrets": {"webRedisUrl": "http://redis:6379"}},
            {"webhook": {"ingress": {"hosts": [{"host": "x.example.com", "paths": [{"path": "/"}]}]}}},
            {"webhook": {"ingress": {"hosts": [{"host": "x.example.com", "paths": [{"path": "/metrics"}]}]}}},
            {"webhook": {"ingress": {"tls": [{"hosts": ["x.example.com"]}]}}},
            {"secrets": {"redisUrl": "redis+sentinel://sentinel:26379/mymaster"}},
            {"worker": {"autoscaling": {"keda": {"redis": {"address": "redis://redis:6379"}}}}},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


def test_install_without_required_settings_fails_naming_the_value():
    """An install that lacks a secret or the client id fails at render time with one line naming the value."""
    with pytest.raises(helm.HelmRenderError, match=r"secrets\.databaseUrl \(DATABASE_URL\) is required"):
        render(None)
    with pytest.raises(helm.HelmRenderError, match=r"config\.SMARTCAR_CLIENT_ID is required"):
        render({"secrets": SECRETS})
    render({"secrets": {"existingSecret": "mine"}, "config": {"SMARTCAR_CLIENT_ID": "id"}})
    without_redis = {key: value for key, value in SECRETS.items() if key != "redisUrl"}
    with pytest.raises(helm.HelmRenderError, match=r"secrets\.redisUrl \(REDIS_URL\) is required"):
        render({"secrets": without_redis | {"webRedisUrl": ROLE_REDIS["webRedisUrl"]}, "config": INSTALL["config"]})
    # the roles' users may not load the Redis functions: the migration Job needs an admin user
    with pytest.raises(helm.HelmRenderError, match=r"secrets\.adminRedisUrl \(or secrets\.redisUrl\) is required"):
        render({"secrets": without_redis | ROLE_REDIS, "config": INSTALL["config"]})
    admin = {"adminRedisUrl": "redis://admin:pw@redis:6379/0"}
    render({"secrets": without_redis | ROLE_REDIS | admin, "config": INSTALL["config"]})
    render({"secrets": without_redis | ROLE_REDIS, "config": INSTALL["config"], "migrations": {"enabled": False}})


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_renders_the_expected_objects(rendered, combination):
    """Each combination renders exactly its objects, webhook and worker templates from their own folders."""
    prefix = f"{RELEASE}-smartcar-ingest"
    found = {f"{obj['kind']}/{obj['metadata']['name'].removeprefix(prefix)}" for obj in rendered[combination]}
    assert found == EXPECTED_OBJECTS[combination]
    for obj in rendered[combination]:
        component = obj["metadata"]["labels"].get("app.kubernetes.io/component")
        if component in {"webhook", "worker", "rq-dashboard"}:
            assert obj["__source__"].startswith(f"smartcar-ingest/templates/{component}/")


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_object_validates_against_kubernetes_schemas(rendered, combination):
    """Every object passes the strict Kubernetes schemas (oldest supported and newest known); CRs their structure."""
    for obj in rendered[combination]:
        body = manifest(obj)
        name = obj["metadata"]["name"]
        assert DNS_LABEL.match(name), name
        custom = CUSTOM_RESOURCE_SCHEMAS.get((body["apiVersion"], body["kind"]))
        if custom is not None:
            jsonschema.validate(body, custom)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(body, version, strict=True)


def test_kubernetes_validation_is_not_vacuous(rendered):
    """The validator used above rejects a misspelt field and a wrongly typed one."""
    deployment = manifest(find(rendered["defaults"], "Deployment", "-webhook"))
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "150"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)
    scaled = copy.deepcopy(manifest(find(rendered["keda"], "ScaledObject", "-worker")))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 50
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, CUSTOM_RESOURCE_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])


def test_names_fit_kubernetes_limits_for_the_longest_release_name():
    """A 53-character release name (Helm's maximum) still yields valid object names."""
    for obj in render(INSTALL, release="r" * 53):
        name = obj["metadata"]["name"]
        assert DNS_LABEL.match(name), name


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_references_between_objects_resolve(rendered, combination):
    """Selectors, scale targets and config references each point at the right rendered object."""
    objects = rendered[combination]
    values = COMBINATIONS[combination]
    by_kind_name = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    deployments = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Deployment"}
    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for name, deployment in deployments.items():
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels[name])
    for obj in objects:
        selector = None
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
        elif obj["kind"] in {"PodDisruptionBudget", "PodMonitor", "NetworkPolicy"}:
            key = "podSelector" if obj["kind"] == "NetworkPolicy" else "selector"
            selector = obj["spec"][key]["matchLabels"]
        if selector is not None:
            matched = [name for name, labels in pod_labels.items() if selects(selector, labels)]
            component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            assert matched == [find(objects, "Deployment", f"-{component}")["metadata"]["name"]], (obj["kind"], matched)
        if obj["kind"] == "NetworkPolicy":
            ports = {p["name"] for p in container(objects, component).get("ports", [])}
            assert {p["port"] for rule in obj["spec"].get("ingress", []) for p in rule["ports"]} <= ports
        if obj["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}:
            assert obj["spec"]["scaleTargetRef"]["name"] in deployments
        if obj["kind"] == "ServiceMonitor":
            services = [o for o in objects if o["kind"] == "Service"]
            (service,) = [
                o for o in services if selects(obj["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])
            ]
            assert {e["port"] for e in obj["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
        if obj["kind"] == "PodMonitor":
            ports = {p["name"] for p in container(objects, "worker").get("ports", [])}
            assert {e["port"] for e in obj["spec"]["podMetricsEndpoints"]} <= ports
    # Secrets the operator manages: the existing one, and the dashboard's basic auth.
    managed = {
        values["secrets"].get("existingSecret"),
        values.get("dashboard", {}).get("basicAuth", {}).get("secretName"),
    }
    for spec in pod_specs(objects).values():
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in by_kind_name
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in managed:
                    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"])
                    assert ref["key"] in secret["data"]


# --- Chart: the properties operators rely on ---------------------------------------------------------


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_pods_meet_the_restricted_pod_security_standard(rendered, combination):
    """Every pod runs as 10001, non-root, RuntimeDefault seccomp, no escalation, no capabilities, read-only root."""
    for where, spec in pod_specs(rendered[combination]).items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] == 10001, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert not {"hostNetwork", "hostPID", "hostIPC"} & spec.keys(), where
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert all(set(v) <= {"name", "emptyDir", "configMap", "secret", "projected"} for v in volumes.values())
        for c in spec["containers"]:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["runAsNonRoot"] is True, where
            assert ctx["runAsUser"] == 10001, where
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in volumes[tmp["name"]], where


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_containers_request_resources_with_a_memory_limit_and_no_cpu_limit(rendered, combination):
    """Every container requests CPU and memory and caps memory, never CPU."""
    for where, spec in pod_specs(rendered[combination]).items():
        for c in spec["containers"]:
            resources = c["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), where
            assert "memory" in resources["limits"], where
            assert "cpu" not in resources["limits"], where


def test_webhook_probes_healthz_for_liveness_and_readyz_on_the_admin_port_for_readiness(rendered):
    """Liveness is GET /healthz on the public port; readiness GET /readyz on the admin port, which ADMIN_PORT names."""
    web = container(rendered["defaults"], "webhook")
    assert web["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert web["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert web["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "admin", "containerPort": 9000, "protocol": "TCP"},
    ]
    assert {"name": "ADMIN_PORT", "value": "9000"} in web["env"]
    assert web["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    moved = container(render(_merge(INSTALL, {"webhook": {"adminPort": 9400}})), "webhook")
    assert {"name": "ADMIN_PORT", "value": "9400"} in moved["env"]
    assert {"name": "admin", "containerPort": 9400, "protocol": "TCP"} in moved["ports"]


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_no_service_publishes_the_admin_port(rendered, combination):
    """The webhook Service exposes only the public port; the admin port has at most a headless in-cluster Service."""
    objects = rendered[combination]
    public = find(objects, "Service", "-webhook")
    assert [(p["name"], p["targetPort"]) for p in public["spec"]["ports"]] == [("http", "http")]
    for service in (o for o in objects if o["kind"] == "Service"):
        if any(p["targetPort"] == "admin" for p in service["spec"]["ports"]):
            assert service["spec"]["type"] == "ClusterIP"
            assert service["spec"]["clusterIP"] == "None"
            assert [p["targetPort"] for p in service["spec"]["ports"]] == ["admin"]
    exposed = render(_merge(INSTALL, {"webhook": {"service": {"type": "LoadBalancer"}}}))
    assert [p["targetPort"] for p in find(exposed, "Service", "-webhook")["spec"]["ports"]] == ["http"]


def test_service_monitor_scrapes_metrics_on_the_admin_port(rendered):
    """The ServiceMonitor scrapes /metrics through the admin port's headless Service, never the public one."""
    objects = rendered["monitoring"]
    monitor = find(objects, "ServiceMonitor", "-webhook")
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("admin", "/metrics")]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert not selects(selector, find(objects, "Service", "-webhook")["metadata"]["labels"])
    admin = find(objects, "Service", "-webhook-admin")
    assert selects(selector, admin["metadata"]["labels"])
    assert admin["spec"]["ports"] == [{"port": 9000, "targetPort": "admin", "protocol": "TCP", "name": "admin"}]


def test_web_and_worker_run_one_image_with_different_commands(rendered):
    """Both Deployments and the migration Job run the same image; only the command differs."""
    objects = rendered["fixed-size"]
    web, worker = container(objects, "webhook"), container(objects, "worker")
    migrations = find(rendered["defaults"], "Job", "-migrations")["spec"]["template"]["spec"]["containers"][0]
    assert web["image"] == worker["image"] == migrations["image"] == "smartcar-ingest:0.1.0"
    assert web["command"] == [
        *("smartcar-ingest", "web", "--host", "0.0.0.0", "--port", "8000", "--workers", "1"),
        *("--max-connections", "1000", "--keep-alive-timeout", "15"),
    ]
    assert worker["command"] == ["smartcar-ingest", "worker", "--concurrency", "4"]
    assert container(rendered["defaults"], "worker")["command"] == ["smartcar-ingest", "worker"]
    assert migrations["command"] == ["smartcar-ingest", "db", "upgrade"]
    digest = "sha256:" + "ab" * 32
    pinned = render(
        _merge(INSTALL, {"image": {"repository": "registry.example.com/smartcar-ingest", "digest": digest}})
    )
    assert container(pinned, "worker")["image"] == f"registry.example.com/smartcar-ingest@{digest}"
    both = render(_merge(INSTALL, {"image": {"tag": "0.1.0", "digest": digest}}))
    job = find(both, "Job", "-migrations")["spec"]["template"]["spec"]["containers"][0]
    assert container(both, "webhook")["image"] == job["image"] == f"smartcar-ingest@{digest}"


def test_worker_grace_outlasts_the_longest_job(rendered):
    """The worker's termination grace exceeds JOB_TIMEOUT_SECONDS, follows it, and a shorter one is refused."""

    def grace(objects):
        return find(objects, "Deployment", "-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert grace(rendered["defaults"]) == 150
    configmap = find(rendered["defaults"], "ConfigMap")
    assert grace(rendered["defaults"]) > int(configmap["data"]["JOB_TIMEOUT_SECONDS"])
    assert grace(render(_merge(INSTALL, {"config": {"JOB_TIMEOUT_SECONDS": 600}}))) == 630
    with pytest.raises(helm.HelmRenderError, match="must exceed JOB_TIMEOUT_SECONDS"):
        render(_merge(INSTALL, {"worker": {"terminationGracePeriodSeconds": 120}}))


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_secret_values_appear_only_in_secrets(rendered, combination):
    """No secret value or secret variable reaches the ConfigMap or any object other than a Secret."""
    configmap = find(rendered[combination], "ConfigMap")
    assert not SECRET_ENV & configmap["data"].keys()
    for obj in rendered[combination]:
        if obj["kind"] != "Secret":
            text = json.dumps(obj)
            assert not [value for value in (*SECRETS.values(), *ROLE_REDIS.values()) if value in text], obj["kind"]


def secret_refs(objects: list[dict[str, Any]], component: str) -> dict[str, dict[str, Any]]:
    """A container's secret-backed variables: name -> secretKeyRef."""
    env = container(objects, component)["env"]
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}


def test_each_process_receives_only_the_secrets_it_uses(rendered):
    """The webhook gets Redis and the management token, plus the database, client secret and state key only with Connect."""
    for combination in ("defaults", "existing-secret"):
        objects = rendered[combination]
        web, worker = env_names(container(objects, "webhook")), env_names(container(objects, "worker"))
        assert web & SECRET_ENV == {"REDIS_URL", "SMARTCAR_MANAGEMENT_TOKEN"}
        assert worker & SECRET_ENV == {"REDIS_URL", "DATABASE_URL", "SMARTCAR_CLIENT_SECRET"}
        assert "METRICS_PORT" in worker
    for combination in ("connect", "everything"):
        web = env_names(container(rendered[combination], "webhook"))
        assert web & SECRET_ENV == SECRET_ENV
    # Connect without a state secret of its own: the web derives it from the management token.
    derived = render(_merge(INSTALL, {"connect": {"enabled": True}, "secrets": {"connectStateSecret": ""}}))
    assert "CONNECT_STATE_SECRET" not in env_names(container(derived, "webhook"))
    assert "CONNECT_STATE_SECRET" not in find(derived, "Secret")["data"]
    # An existing Secret need not hold CONNECT_STATE_SECRET.
    assert secret_refs(rendered["everything"], "webhook")["CONNECT_STATE_SECRET"]["optional"] is True
    refs = [
        entry["valueFrom"]["secretKeyRef"]["name"]
        for entry in container(rendered["existing-secret"], "webhook")["env"]
        if "valueFrom" in entry
    ]
    assert set(refs) == {"smartcar-ingest-secrets"}


def test_worker_metrics_port_follows_the_metrics_switch(rendered):
    """The worker gets METRICS_PORT=9100 and a metrics port by default, and METRICS_PORT=0 when metrics are off."""

    def metrics_env(objects):
        worker = container(objects, "worker")
        return next(e["value"] for e in worker["env"] if e["name"] == "METRICS_PORT"), worker.get("ports", [])

    value, ports = metrics_env(rendered["defaults"])
    assert value == "9100"
    assert ports == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    value, ports = metrics_env(render(_merge(INSTALL, {"worker": {"metrics": {"enabled": False}}})))
    assert (value, ports) == ("0", [])


def test_settings_render_as_environment_strings(rendered):
    """Settings reach the ConfigMap as strings, whole numbers without exponents, empty ones left out."""
    data = find(rendered["defaults"], "ConfigMap")["data"]
    assert data["INGEST_QUEUE"] == "smartcar-events"
    assert data["JOB_TIMEOUT_SECONDS"] == "120"
    assert "SPOOL_DIR" not in data
    big = render(_merge(INSTALL, {"config": {"MAX_BODY_BYTES": 1_000_000, "REDIS_TIMEOUT_SECONDS": 0.25}}))
    data = find(big, "ConfigMap")["data"]
    assert data["MAX_BODY_BYTES"] == "1000000"
    assert data["REDIS_TIMEOUT_SECONDS"] == "0.25"


def test_quota_settings_render_and_every_one_is_a_setting_the_workers_read(rendered):
    """The quota settings reach the ConfigMap with the service's defaults (an empty budget left out,
    so no limit); a budget set in values renders as given and is one Settings accepts."""
    from core.config import Settings

    data = find(rendered["defaults"], "ConfigMap")["data"]
    assert data["VEHICLE_INFO_TTL_SECONDS"] == "86400"
    assert data["SIGNALS_MAX_AGE_SECONDS"] == "300"
    assert data["ENRICH_WAIT_SECONDS"] == "10"
    assert "SMARTCAR_REQUESTS_PER_MINUTE" not in data
    assert "SMARTCAR_BURST" not in data
    budget = {"SMARTCAR_REQUESTS_PER_MINUTE": 2, "SMARTCAR_BURST": 120, "SIGNALS_MAX_AGE_SECONDS": 0}
    data = find(render(_merge(INSTALL, {"config": budget})), "ConfigMap")["data"]
    assert (data["SMARTCAR_REQUESTS_PER_MINUTE"], data["SMARTCAR_BURST"], data["SIGNALS_MAX_AGE_SECONDS"]) == (
        "2",
        "120",
        "0",
    )
    names = ("VEHICLE_INFO_TTL_SECONDS", "SIGNALS_MAX_AGE_SECONDS", "SMARTCAR_REQUESTS_PER_MINUTE", "SMARTCAR_BURST")
    settings = Settings(_env_file=None, **{name.lower(): data[name] for name in (*names, "ENRICH_WAIT_SECONDS")})  # type: ignore[arg-type]
    assert (settings.smartcar_requests_per_minute, settings.smartcar_burst, settings.signals_max_age_seconds) == (
        2,
        120,
        0,
    )


def test_the_dashboard_shows_what_enrichment_costs_smartcar(rendered):
    """A row of the dashboard shows calls per event, reads by call and source, limiter waits and
    denials, and 429s by scope."""
    configmap = find(rendered["monitoring"], "ConfigMap", "-dashboard")
    (text,) = configmap["data"].values()
    panels = [p for p in json.loads(text)["panels"] if p["type"] != "row"]
    queried = {name for p in panels for t in p["targets"] for name in METRIC_NAME.findall(t["expr"])}
    assert {
        "smartcar_ingest_enrichment_reads_total",
        "smartcar_ingest_limiter_wait_seconds_bucket",
        "smartcar_ingest_limiter_denials_total",
        "smartcar_ingest_rate_limited_total",
    } <= queried
    [per_event] = [p for p in panels if p["title"] == "Smartcar calls per event"]
    assert "smartcar_ingest_smartcar_calls_total" in per_event["targets"][0]["expr"]
    assert 'outcome="published"' in per_event["targets"][0]["expr"]


def test_keda_scales_workers_on_the_rq_queue_list(rendered):
    """With KEDA on, a ScaledObject watches rq:queue:<INGEST_QUEUE> with its Redis auth, and no worker HPA renders."""
    objects = rendered["keda"]
    trigger = find(objects, "ScaledObject", "-worker")["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == "rq:queue:smartcar-events"
    assert trigger["metadata"]["address"] == "redis-master:6379"
    auth = find(objects, "TriggerAuthentication", "-worker")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "redis", "key": "redis-password"}]
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler" and "worker" in o["metadata"]["name"]]
    assert "replicas" not in find(objects, "Deployment", "-worker")["spec"]
    renamed = render(_merge(COMBINATIONS["keda"], {"config": {"INGEST_QUEUE": "fleet-b"}}))
    assert find(renamed, "ScaledObject", "-worker")["spec"]["triggers"][0]["metadata"]["listName"] == "rq:queue:fleet-b"
    with pytest.raises(helm.HelmRenderError, match=r"keda\.redis\.address"):
        render(_merge(INSTALL, {"worker": {"autoscaling": {"keda": {"enabled": True}}}}))


def test_migrations_run_once_as_a_pre_install_and_pre_upgrade_hook(rendered):
    """The migration Job is a pre-install/pre-upgrade hook that needs nothing the release creates after it."""
    for combination in ("defaults", "existing-secret"):
        objects = rendered[combination]
        job = find(objects, "Job", "-migrations")
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        spec = job["spec"]["template"]["spec"]
        assert "serviceAccountName" not in spec  # the chart's ServiceAccount does not exist yet
        assert spec["restartPolicy"] == "Never"
        (c,) = spec["containers"]
        assert "envFrom" not in c  # nor does the chart's ConfigMap
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e]
        assert ref["key"] == "DATABASE_URL"
        if combination == "existing-secret":
            assert ref["name"] == "smartcar-ingest-secrets"
        else:
            secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"])
            hook = secret["metadata"]["annotations"]
            assert hook["helm.sh/hook"] == annotations["helm.sh/hook"]
            assert int(hook["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
            assert set(secret["data"]) == {"DATABASE_URL", "REDIS_URL"}
        # the Redis functions are loaded first, with the admin REDIS_URL (issue 26.2)
        (setup,) = spec["initContainers"]
        assert setup["command"] == ["smartcar-ingest", "redis-setup"]
        (redis_ref,) = [e["valueFrom"]["secretKeyRef"] for e in setup["env"] if "valueFrom" in e]
        assert redis_ref["key"] == "REDIS_URL"
        assert redis_ref["name"] == ref["name"]
    for component in ("webhook", "worker"):
        assert "initContainers" not in find(rendered["defaults"], "Deployment", f"-{component}")["spec"]["template"]
    existing_account = render(_merge(INSTALL, {"serviceAccount": {"create": False, "name": "smartcar"}}))
    job = find(existing_account, "Job", "-migrations")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "smartcar"


def test_autoscaling_and_disruption_budgets_by_default(rendered):
    """By default an HPA on CPU scales each Deployment (no fixed replicas) and each has a PodDisruptionBudget."""
    objects = rendered["defaults"]
    for component in ("webhook", "worker"):
        hpa = find(objects, "HorizontalPodAutoscaler", f"-{component}")
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] >= 2
        assert "replicas" not in find(objects, "Deployment", f"-{component}")["spec"]
        pdb = find(objects, "PodDisruptionBudget", f"-{component}")
        assert pdb["spec"]["maxUnavailable"] == 1
    fixed = rendered["fixed-size"]
    assert find(fixed, "Deployment", "-webhook")["spec"]["replicas"] == 2
    assert find(fixed, "PodDisruptionBudget", "-webhook")["spec"] == {
        "minAvailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": find(fixed, "Deployment", "-webhook")["spec"]["selector"],
    }


def test_ingress_routes_only_the_public_endpoints(rendered):
    """The Ingress routes the webhook (and the Connect callback with Connect on), never /metrics or the probes."""
    ingress = find(rendered["ingress"], "Ingress", "-webhook")
    (rule,) = ingress["spec"]["rules"]
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/webhooks/smartcar", "Exact")]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["smartcar-ingest.example.com"], "secretName": "smartcar-ingest-tls"}]
    (rule,) = find(rendered["everything"], "Ingress", "-webhook")["spec"]["rules"]
    assert [p["path"] for p in rule["http"]["paths"]] == ["/webhooks/smartcar", "/connect/callback"]


def test_ingress_ships_with_tls_and_refuses_to_render_without_it():
    """An enabled Ingress has a TLS block by default; an empty one fails the render unless allowWithoutTls."""
    ingress = find(render(_merge(INSTALL, {"webhook": {"ingress": {"enabled": True}}})), "Ingress", "-webhook")
    assert ingress["spec"]["tls"] == [{"hosts": ["smartcar-ingest.example.com"], "secretName": "smartcar-ingest-tls"}]
    plain = _merge(INSTALL, {"webhook": {"ingress": {"enabled": True, "tls": []}}})
    with pytest.raises(helm.HelmRenderError, match=r"webhook\.ingress\.tls is empty"):
        render(plain)
    allowed = render(_merge(plain, {"webhook": {"ingress": {"allowWithoutTls": True}}}))
    assert "tls" not in find(allowed, "Ingress", "-webhook")["spec"]


def test_each_role_can_log_in_to_redis_as_its_own_user(rendered):
    """secrets.webRedisUrl / workerRedisUrl reach only their role as REDIS_URL; either falls back to secrets.redisUrl."""
    objects = rendered["connect"]
    data = find(objects, "Secret")["data"]
    assert {"WEB_REDIS_URL", "WORKER_REDIS_URL"} <= data.keys()
    assert "REDIS_URL" not in data  # no role uses it any more
    assert secret_refs(objects, "webhook")["REDIS_URL"]["key"] == "WEB_REDIS_URL"
    assert secret_refs(objects, "worker")["REDIS_URL"]["key"] == "WORKER_REDIS_URL"
    web_only = render(_merge(INSTALL, {"secrets": {"webRedisUrl": ROLE_REDIS["webRedisUrl"]}}))
    assert secret_refs(web_only, "webhook")["REDIS_URL"]["key"] == "WEB_REDIS_URL"
    assert secret_refs(web_only, "worker")["REDIS_URL"]["key"] == "REDIS_URL"
    assert {"REDIS_URL", "WEB_REDIS_URL"} <= find(web_only, "Secret")["data"].keys()
    for component in ("webhook", "worker"):
        assert secret_refs(rendered["defaults"], component)["REDIS_URL"]["key"] == "REDIS_URL"
    keys = {"existingSecretRedisKeys": {"web": "WEB_REDIS_URL", "worker": "WORKER_REDIS_URL"}}
    existing = render(_merge(EXISTING_SECRET, {"secrets": keys}))
    assert secret_refs(existing, "webhook")["REDIS_URL"] == {"name": "smartcar-ingest-secrets", "key": "WEB_REDIS_URL"}
    assert secret_refs(existing, "worker")["REDIS_URL"] == {
        "name": "smartcar-ingest-secrets",
        "key": "WORKER_REDIS_URL",
    }


def _rule_ports(rules: list[dict[str, Any]]) -> set[int | str]:
    return {port["port"] for rule in rules for port in rule["ports"]}


def test_network_policies_admit_only_the_public_port_and_monitoring(rendered):
    """Web pods take the public port from anywhere and the admin port from monitoring; workers only metrics from monitoring."""
    objects = rendered["defaults"]
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    web = find(objects, "NetworkPolicy", "-webhook")["spec"]
    assert web["policyTypes"] == ["Ingress", "Egress"]
    assert web["ingress"] == [
        {"ports": [{"port": "http", "protocol": "TCP"}]},
        {"ports": [{"port": "admin", "protocol": "TCP"}], "from": monitoring},
    ]
    worker = find(objects, "NetworkPolicy", "-worker")["spec"]
    assert worker["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}], "from": monitoring}]
    narrowed = render(
        _merge(
            INSTALL,
            {
                "networkPolicy": {"publicFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]},
                "worker": {"metrics": {"enabled": False}},
            },
        )
    )
    public = find(narrowed, "NetworkPolicy", "-webhook")["spec"]["ingress"][0]
    assert public["from"] == [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]
    worker = find(narrowed, "NetworkPolicy", "-worker")["spec"]
    assert "ingress" not in worker  # with Ingress among the policy types: nothing reaches a worker
    assert "Ingress" in worker["policyTypes"]
    unmonitored = render(_merge(INSTALL, {"networkPolicy": {"monitoringFrom": []}}))
    assert _rule_ports(find(unmonitored, "NetworkPolicy", "-webhook")["spec"]["ingress"]) == {"http"}
    off = render(_merge(INSTALL, {"networkPolicy": {"enabled": False}}))
    assert not [o for o in off if o["kind"] == "NetworkPolicy"]


def test_network_policies_allow_only_the_egress_each_role_needs(rendered):
    """Egress is DNS and Redis for the web (plus PostgreSQL and HTTPS with Connect); DNS, Redis, PostgreSQL, HTTPS for workers."""
    web = find(rendered["defaults"], "NetworkPolicy", "-webhook")["spec"]["egress"]
    assert _rule_ports(web) == {53, 6379}
    worker = find(rendered["defaults"], "NetworkPolicy", "-worker")["spec"]["egress"]
    assert _rule_ports(worker) == {53, 6379, 5432, 443}
    https = next(rule for rule in worker if rule["ports"][0]["port"] == 443)
    assert https["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert "10.0.0.0/8" in https["to"][0]["ipBlock"]["except"]
    dns = next(rule for rule in worker if rule["ports"][0]["port"] == 53)
    assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"}
    assert _rule_ports(find(rendered["connect"], "NetworkPolicy", "-webhook")["spec"]["egress"]) == {
        53,
        6379,
        5432,
        443,
    }
    redis_peer = [{"ipBlock": {"cidr": "10.20.0.0/24"}}]
    pinned = render(
        _merge(
            INSTALL,
            {"networkPolicy": {"egress": {"redis": {"to": redis_peer, "ports": [{"port": 6380, "protocol": "TCP"}]}}}},
        )
    )
    for component in ("webhook", "worker"):
        rules = find(pinned, "NetworkPolicy", f"-{component}")["spec"]["egress"]
        redis_rule = next(rule for rule in rules if rule["ports"][0]["port"] == 6380)
        assert redis_rule["to"] == redis_peer
        assert 6379 not in _rule_ports(rules)


def _dashboard_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "rq-dashboard"]


def test_dashboard_is_off_by_default_and_never_published(rendered):
    """rq-dashboard renders nothing by default; enabled, it is a ClusterIP Service only: no Ingress, no LoadBalancer."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["dashboard"]["enabled"] is False
    assert values["dashboard"]["disableDelete"] is True
    for combination in ("defaults", "monitoring", "connect"):
        assert not _dashboard_objects(rendered[combination]), combination
    for combination in ("dashboard", "everything"):
        objects = rendered[combination]
        service = find(objects, "Service", "-rq-dashboard")
        assert service["spec"]["type"] == "ClusterIP"
        assert not {"clusterIP", "externalIPs", "loadBalancerIP"} & service["spec"].keys()
        assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(9181, "http")]
        backends = [
            path["backend"]["service"]["name"]
            for ingress in (o for o in objects if o["kind"] == "Ingress")
            for rule in ingress["spec"]["rules"]
            for path in rule["http"]["paths"]
        ]
        assert service["metadata"]["name"] not in backends
        assert not [o for o in objects if o["kind"] == "Service" and o["spec"]["type"] in {"LoadBalancer", "NodePort"}]
    with helm.Chart.load(CHART) as chart:
        for bad in (
            {"dashboard": {"enabled": True, "service": {"type": "LoadBalancer", "port": 9181}}},
            {"dashboard": {"enabled": True, "ingress": {"enabled": True}}},
            {"secrets": {"dashboardRedisUrl": "http://not-redis"}},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(_merge(INSTALL, bad))


def test_dashboard_runs_rq_dashboard_over_json_jobs_without_deleting(rendered):
    """The container runs rq-dashboard --json --disable-delete from its own image, TCP probes, no service secret."""
    objects = rendered["dashboard"]
    dashboard = container(objects, "rq-dashboard")
    assert dashboard["image"] == "smartcar-ingest-dashboard:0.1.0"
    assert dashboard["command"] == ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181", "--json", "--disable-delete"]
    assert dashboard["ports"] == [{"name": "http", "containerPort": 9181, "protocol": "TCP"}]
    assert dashboard["livenessProbe"]["tcpSocket"] == dashboard["readinessProbe"]["tcpSocket"] == {"port": "http"}
    assert "envFrom" not in dashboard  # none of the service's settings
    assert env_names(dashboard) == {"RQ_DASHBOARD_REDIS_URL", "RQ_DASHBOARD_USERNAME", "RQ_DASHBOARD_PASSWORD"}
    auth = secret_refs(objects, "rq-dashboard")
    assert auth["RQ_DASHBOARD_USERNAME"] == {"name": "rq-dashboard-auth", "key": "username"}
    assert auth["RQ_DASHBOARD_PASSWORD"] == {"name": "rq-dashboard-auth", "key": "password"}
    spec = find(objects, "Deployment", "-rq-dashboard")["spec"]
    assert spec["replicas"] == 1
    digest = "sha256:" + "cd" * 32
    tuned = render(
        _merge(
            COMBINATIONS["dashboard"],
            {
                "dashboard": {
                    "image": {"repository": "registry.example.com/rq-dashboard", "digest": digest},
                    "disableDelete": False,
                    "urlPrefix": "/rq",
                    "basicAuth": {"secretName": ""},
                }
            },
        )
    )
    changed = container(tuned, "rq-dashboard")
    assert changed["image"] == f"registry.example.com/rq-dashboard@{digest}"
    assert changed["command"][-3:] == ["--json", "--url-prefix", "/rq"]
    assert "--disable-delete" not in changed["command"]
    assert env_names(changed) == {"RQ_DASHBOARD_REDIS_URL"}


def test_dashboard_takes_its_redis_url_from_the_secret_like_the_other_pods(rendered):
    """RQ_DASHBOARD_REDIS_URL comes from the workers' key by default, or from the dashboard's own URL or key."""
    assert secret_refs(rendered["dashboard"], "rq-dashboard")["RQ_DASHBOARD_REDIS_URL"] == {
        "name": "ingest-smartcar-ingest",
        "key": "REDIS_URL",
    }
    assert secret_refs(rendered["everything"], "rq-dashboard")["RQ_DASHBOARD_REDIS_URL"] == {
        "name": "smartcar-ingest-secrets",
        "key": "REDIS_URL",
    }
    split = render(_merge(COMBINATIONS["dashboard"], {"secrets": ROLE_REDIS}))
    assert secret_refs(split, "rq-dashboard")["RQ_DASHBOARD_REDIS_URL"]["key"] == "WORKER_REDIS_URL"
    own_url = "redis://dashboard:dash-pass-5e1b@redis-master:6379/0"
    own = render(_merge(COMBINATIONS["dashboard"], {"secrets": {"dashboardRedisUrl": own_url}}))
    assert secret_refs(own, "rq-dashboard")["RQ_DASHBOARD_REDIS_URL"]["key"] == "DASHBOARD_REDIS_URL"
    assert find(own, "Secret")["data"]["DASHBOARD_REDIS_URL"]
    assert not [o for o in own if o["kind"] != "Secret" and own_url in json.dumps(o)]
    # Off, the chart keeps no dashboard URL at all.
    unused = render(_merge(INSTALL, {"secrets": {"dashboardRedisUrl": own_url}}))
    assert "DASHBOARD_REDIS_URL" not in find(unused, "Secret")["data"]
    keyed = render(_merge(COMBINATIONS["everything"], {"secrets": {"existingSecretRedisKeys": {"dashboard": "DASH"}}}))
    assert secret_refs(keyed, "rq-dashboard")["RQ_DASHBOARD_REDIS_URL"] == {
        "name": "smartcar-ingest-secrets",
        "key": "DASH",
    }


def test_dashboard_network_policy_admits_only_the_named_peers(rendered):
    """Only dashboard.networkPolicy.from may reach the dashboard's port (nobody when empty); egress is DNS and Redis."""
    policy = find(rendered["dashboard"], "NetworkPolicy", "-rq-dashboard")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}], "from": [PROXY_PEER]}]
    assert _rule_ports(policy["egress"]) == {53, 6379}
    closed = render(_merge(INSTALL, {"dashboard": {"enabled": True}}))
    spec = find(closed, "NetworkPolicy", "-rq-dashboard")["spec"]
    assert "ingress" not in spec
    assert "Ingress" in spec["policyTypes"]
    off = render(_merge(COMBINATIONS["dashboard"], {"networkPolicy": {"enabled": False}}))
    assert not [o for o in off if o["kind"] == "NetworkPolicy"]


def test_empty_optional_values_emit_nothing(rendered):
    """Unset optional blocks (annotations, selectors, tolerations, pull secrets…) leave no empty keys behind."""
    empty_value = re.compile(r"^\s*[A-Za-z]+: (\{\}|\[\]|null|\"\")$", re.MULTILINE)
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(INSTALL, name=RELEASE, namespace=NAMESPACE)
    for path, text in manifests.items():
        assert not empty_value.findall(text), path
    for spec in pod_specs(rendered["defaults"]).values():
        assert not {"imagePullSecrets", "nodeSelector", "affinity", "tolerations", "priorityClassName"} & spec.keys()


def test_every_key_in_values_yaml_is_commented():
    """Each key in values.yaml has a comment above it, unless it is part of a value documented with `# --`."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(?P<indent> *)[A-Za-z_][A-Za-z0-9_]*:")
    ancestors: list[tuple[int, bool]] = []  # (indent, documented as a whole value)
    undocumented = []
    for number, line in enumerate(lines):
        match = key.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        if any(documented for _, documented in ancestors):
            ancestors.append((indent, True))
            continue
        first = above = number - 1
        while first - 1 >= 0 and lines[first - 1].strip().startswith("#"):
            first -= 1
        commented = above >= 0 and lines[above].strip().startswith("#")
        if not commented:
            undocumented.append(f"{number + 1}: {line.strip()}")
        ancestors.append((indent, commented and lines[first].strip().startswith("# --")))
    assert not undocumented, undocumented


# --- Chart: dashboard and alerts ---------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every sample name the processes export: core.metrics' counters and histograms, the queue gauges."""
    from prometheus_client import Metric
    from prometheus_client.metrics import MetricWrapperBase

    from core import metrics
    from core.config import Settings
    from core.redis.queue_metrics import QueueCollector

    families: list[Metric] = []
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            families.extend(value.describe())
    collector = QueueCollector(Settings(_env_file=None, redis_url="redis://unused.invalid:6379/0"))  # type: ignore[call-arg]
    families.extend(collector.describe())
    collector.close()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}


METRIC_NAME = re.compile(r"\bsmartcar_ingest_[a-z0-9_]+")


def _check_promql(expr: str, known: set[str]) -> None:
    names = set(METRIC_NAME.findall(expr))
    assert names, expr
    assert names <= known, (sorted(names - known), expr)
    depth = 0
    for char in expr:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, expr
    assert depth == 0, expr
    assert expr.count("{") == expr.count("}"), expr


def test_exported_metric_names_are_known():
    """The names the dashboard and alerts are checked against include each kind of metric (not vacuous)."""
    known = exported_metric_names()
    assert {
        "smartcar_ingest_deliveries_total",
        "smartcar_ingest_jobs_total",
        "smartcar_ingest_end_to_end_seconds_bucket",
        "smartcar_ingest_smartcar_calls_total",
        "smartcar_ingest_queue_depth",
        "smartcar_ingest_queue_oldest_age_seconds",
        "smartcar_ingest_parked_stream_length",
        "smartcar_ingest_redis_memory_used_bytes",
        "smartcar_ingest_redis_memory_max_bytes",
        "smartcar_ingest_output_group_behind_seconds",
        "smartcar_ingest_output_stream_retention_seconds",
    } <= known
    assert "smartcar_ingest_jobs" not in known


def test_grafana_dashboard_ships_as_a_labelled_configmap_over_known_metrics(rendered):
    """The dashboard ConfigMap carries grafana_dashboard: "1" and valid JSON whose queries use only exported metrics."""
    configmap = find(rendered["monitoring"], "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Smartcar"}
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    assert dashboard == json.loads((CHART / "dashboards" / "smartcar-ingest.json").read_text())
    assert dashboard["uid"] == "smartcar-ingest"
    known = exported_metric_names()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            _check_promql(target["expr"], known)
    queried = {name for p in panels for t in p["targets"] for name in METRIC_NAME.findall(t["expr"])}
    for required in ("smartcar_ingest_queue_oldest_age_seconds", "smartcar_ingest_end_to_end_seconds_bucket"):
        assert required in queried
    assert not [
        o for o in rendered["defaults"] if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
    ]


def test_prometheus_rule_alerts_on_smartcars_advice_over_known_metrics(rendered):
    """The PrometheusRule alerts on success under 95%, latency over 5 s, repeated 503s, parked growth and queue age."""
    rule = find(rendered["monitoring"], "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    rules = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert {
        "SmartcarIngestWebhookSuccessLow",
        "SmartcarIngestWebhookSlow",
        "SmartcarIngestWebhookFailing",
        "SmartcarIngestParkedGrowing",
        "SmartcarIngestQueueStalled",
        "SmartcarIngestRedisMemoryHigh",
        "SmartcarIngestConsumerGroupBehind",
    } <= rules.keys()
    known = exported_metric_names()
    for name, alert in rules.items():
        _check_promql(alert["expr"], known)
        assert 'namespace="smartcar"' in alert["expr"], name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["labels"]["team"] == "fleet", name
        assert alert["annotations"]["summary"], name
    assert rules["SmartcarIngestWebhookSuccessLow"]["expr"].rstrip().endswith("> 0.05")
    assert rules["SmartcarIngestWebhookSlow"]["expr"].rstrip().endswith("> 5")
    assert rules["SmartcarIngestWebhookFailing"]["expr"].rstrip().endswith(">= 3")
    assert rules["SmartcarIngestQueueStalled"]["expr"].rstrip().endswith("> 60")
    # issue 16: warn at 80% of maxmemory, and for a consumer group 80% of the output retention behind
    assert rules["SmartcarIngestRedisMemoryHigh"]["expr"].rstrip().endswith("> 0.8")
    assert "smartcar_ingest_redis_memory_max_bytes" in rules["SmartcarIngestRedisMemoryHigh"]["expr"]
    assert rules["SmartcarIngestConsumerGroupBehind"]["expr"].rstrip().endswith("> 0.8")
    assert "{{ $value" in rules["SmartcarIngestQueueStalled"]["annotations"]["description"]
    tuned = render(_merge(COMBINATIONS["monitoring"], {"prometheusRule": {"queueOldestAgeSeconds": 300}}))
    tuned_rules = {r["alert"]: r for g in find(tuned, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert tuned_rules["SmartcarIngestQueueStalled"]["expr"].rstrip().endswith("> 300")
    assert not [o for o in rendered["defaults"] if o["kind"] == "PrometheusRule"]
