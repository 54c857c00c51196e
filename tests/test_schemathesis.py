"""Schemathesis against a live ``smartcar-ingest web`` and real Redis, driven by the API documents.

The CLI runs as a child process, exactly as README ("The API contract") tells an operator to run
it, once per port with that port's document and nothing else: docs/openapi.yaml against the
public port, docs/openapi-admin.yaml against ``ADMIN_PORT``, with the checkout's
schemathesis.toml. Its deliveries are signed by :mod:`tests.schemathesis_hooks`, so the signed
paths (accepted, duplicate, parked, refused, VERIFY) are explored, not only the 401s.

Checks: all of them (``--checks all``): no 5xx, every status, header, content type and body as
documented, schema-valid requests taken and schema-violating ones refused, 405 with ``Allow``
for every undeclared method. The run is deterministic (``--generation-deterministic``) and
bounded: the examples and coverage phases are a fixed set of cases, the fuzzing phase makes at
most :data:`MAX_EXAMPLES` per operation. Every case is tallied from Schemathesis' NDJSON report,
per check and per status, and the tally is printed (``pytest -rP`` shows it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import requests
import yaml

from tests.conftest import TOKEN
from tests.procs import RedisServer, WebProcess, free_port, service_env, wait_for_port
from tests.schemathesis_hooks import SIGN_ME, SignBody

ROOT = Path(__file__).resolve().parent.parent
#: The document of each port: a port is tested with its own document, whole.
DOCUMENTS = {"public": ROOT / "docs" / "openapi.yaml", "admin": ROOT / "docs" / "openapi-admin.yaml"}
#: What Schemathesis cannot read in the documents: the 400s a schema-valid request may still get.
CONFIG = ROOT / "schemathesis.toml"
#: Every check Schemathesis has (``--checks all``); the run fails on any failure of any of them.
CHECKS = "all"
#: The checks that must have run on each port, not merely passed: the response conformance checks,
#: valid and invalid data, and the undeclared methods, so that a green run means each was tried.
MUST_RUN = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "positive_data_acceptance",
    "unsupported_method",
)
#: Cases per operation in the fuzzing phase: with the fixed phases, the public port's run takes 20-30 s.
MAX_EXAMPLES = 100
#: A run that takes longer than this is stuck, not slow.
RUN_TIMEOUT_SECONDS = 600
WEBHOOK = "POST /webhooks/smartcar"


@dataclass
class Served:
    public: str
    admin: str
    redis: redis.Redis


@dataclass
class Tally:
    """What one run did, read from its NDJSON report."""

    cases: int = 0
    #: check name → {"success": n, "failure": n, …}
    checks: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    #: operation → {"202 accepted": n, "401": n, …} (a 202's receipt status is part of its key)
    statuses: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def report(self) -> str:
        lines = [f"{self.cases} test cases"]
        for name, counts in sorted(self.checks.items()):
            lines.append(f"  {name}: {counts['success']} passed, {counts['failure']} failed")
        for operation, counts in sorted(self.statuses.items()):
            lines.append(f"  {operation}: " + ", ".join(f"{key}: {n}" for key, n in sorted(counts.items())))
        return "\n".join(lines)


def read_report(path: Path) -> Tally:
    tally = Tally()
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is None:
            continue
        recorder = finished["recorder"]
        tally.cases += len(recorder.get("cases", {}))
        for results in recorder.get("checks", {}).values():
            for result in results:
                tally.checks[result["name"]][result["status"]] += 1
        for interaction in recorder.get("interactions", {}).values():
            response = interaction.get("response")
            if response is not None:
                tally.statuses[recorder["label"]][status_key(response)] += 1
    return tally


def status_key(response: dict) -> str:
    """``"202 accepted"`` for a receipt, else the status code alone."""
    status = str(response["status_code"])
    if status == "202":
        body = json.loads(base64.b64decode(response["content"]["$base64"]))
        status += f" {body['status']}"
    return status


def run_schemathesis(url: str, document: Path, workdir: Path) -> tuple[str, Tally]:
    """Run the CLI on all of ``document`` against ``url``; its output (asserted to exit 0) and tally."""
    report = workdir / "report.ndjson"
    args = [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(CONFIG)]
    args += ["run", str(document), "--url", url]
    args += ["--checks", CHECKS, "--phases", "examples,coverage,fuzzing"]
    args += ["--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--workers", "1"]
    args += ["--request-timeout", "10", "--report", "ndjson", "--report-ndjson-path", str(report)]
    env = service_env(
        SMARTCAR_MANAGEMENT_TOKEN=TOKEN, SCHEMATHESIS_HOOKS="tests.schemathesis_hooks", PYTHONPATH=str(ROOT)
    )
    # cwd: Schemathesis keeps its cache and default report directory there.
    result = subprocess.run(args, env=env, cwd=workdir, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    tally = read_report(report)
    print(output, tally.report(), sep="\n")
    return output, tally


def assert_every_check_passed(tally: Tally) -> None:
    for name in MUST_RUN:
        assert tally.checks[name]["success"] > 0, f"{name} never ran"
    failed = {name: counts for name, counts in tally.checks.items() if set(counts) - {"success"}}
    assert failed == {}, tally.report()


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``smartcar-ingest web`` on two free ports, with /connect/start on, against the session's Redis."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    workdir = tmp_path_factory.mktemp("schemathesis-web")
    admin = free_port()
    env = service_env(
        PYTHONPATH=str(ROOT),
        SMARTCAR_MANAGEMENT_TOKEN=TOKEN,
        REDIS_URL=redis_server.url,
        DATABASE_URL=f"sqlite:///{workdir / 'users.db'}",
        ADMIN_HOST="127.0.0.1",
        ADMIN_PORT=str(admin),
        CONNECT_START_ENABLED="true",
        CONNECT_REDIRECT_URI="http://127.0.0.1/connect/callback",
        SMARTCAR_APPLICATION_ID="schemathesis-application",
        LOG_LEVEL="ERROR",  # thousands of parked and refused deliveries are logged at WARNING and INFO
    )
    with WebProcess(env, cwd=workdir) as web:
        wait_for_port(admin, timeout=30)
        admin_url = f"http://127.0.0.1:{admin}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{admin_url}/readyz").status_code != 200:  # "starting" is a 503
            assert time.monotonic() < deadline, "the web process never became ready"
            time.sleep(0.05)
        yield Served(web.url, admin_url, client)
    client.flushall()
    client.close()


@pytest.mark.process
def test_public_port_conforms_to_the_document(served, tmp_path):
    """docs/openapi.yaml, whole, on the public port: every check passes; signed deliveries get through."""
    _, tally = run_schemathesis(served.public, DOCUMENTS["public"], tmp_path)
    assert_every_check_passed(tally)
    assert tally.checks["negative_data_rejection"]["success"] > 0
    webhook = tally.statuses[WEBHOOK]
    # Signed on the bytes sent: accepted and parked; VERIFY answered; unsigned and refused bodies seen too.
    for outcome in ("202 accepted", "202 duplicate", "202 parked", "200", "400", "401"):
        assert webhook[outcome] > 0, (outcome, tally.report())
    assert served.redis.llen("rq:queue:smartcar-events") > 0
    assert served.redis.xlen("smartcar:parked") > 0
    assert tally.statuses["GET /connect/start"]["302"] > 0


@pytest.mark.process
def test_admin_port_conforms_to_the_document(served, tmp_path):
    """docs/openapi-admin.yaml, whole, on ADMIN_PORT: /readyz and /metrics pass every check."""
    _, tally = run_schemathesis(served.admin, DOCUMENTS["admin"], tmp_path)
    assert_every_check_passed(tally)
    assert tally.statuses["GET /readyz"]["200"] > 0
    assert tally.statuses["GET /metrics"]["200"] > 0


# --- the signing hook ------------------------------------------------------------------------


def prepared(headers: dict[str, str], document: object) -> requests.PreparedRequest:
    request = requests.Request("POST", "http://127.0.0.1/webhooks/smartcar", headers=headers, json=document)
    return SignBody(TOKEN.encode())(request.prepare())


def test_hook_signs_the_exact_bytes_sent():
    """A 64-hex SC-Signature is replaced by HMAC-SHA256 of the serialised body, as the service verifies it."""
    request = prepared({"SC-Signature": "0" * 64}, {"eventId": "é", "n": [1.5, None]})
    assert isinstance(request.body, bytes)
    expected = hmac.new(TOKEN.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers["SC-Signature"] == expected


def test_hook_leaves_other_signatures_alone():
    """A missing header stays missing, and a value not of a signature's form is sent as generated."""
    assert "SC-Signature" not in prepared({}, {"eventType": "VERIFY"}).headers
    assert prepared({"SC-Signature": "not-hex"}, {}).headers["SC-Signature"] == "not-hex"


def test_hook_signs_exactly_the_documents_signature_form():
    """The document gives SC-Signature two forms, a signature's (64 hex digits) and anything else; the hook
    signs the first and no other, so both are sent: signed cases, and unsigned ones with a header."""
    document = yaml.safe_load(DOCUMENTS["public"].read_text())
    signature, anything_else = document["components"]["parameters"]["ScSignature"]["schema"]["anyOf"]
    assert signature["pattern"] == anything_else["not"]["pattern"] == f"^{SIGN_ME.pattern}$"
