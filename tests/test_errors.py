"""The error tree: every class is raised somewhere, each maps to one documented exit status, and
the two boundaries that refuse instead of guessing (the job argument, a stock RQ worker)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import redis
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from rq.serializers import JSONSerializer

from cli import main as cli_main
from cli.samples import encode, sample_event
from core import errors
from core.errors import ConfigurationError, IngestError, InvalidJob, PermanentError, TransientError
from core.redis.jobs import PROCESS_EVENT, job_payload
from tests.pipeline import outputs, run_worker_burst
from workers.jobs import read_payload

ROOT = Path(__file__).resolve().parent.parent
#: The packages that ship; the emulator, benchmarks and tests do not count as "raised somewhere".
SHIPPED = ("core", "service", "workers", "cli")
#: Classes that only group others and are never raised themselves.
INNER = {IngestError, TransientError, PermanentError}

ERROR_CLASSES = [
    cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, IngestError) and cls not in INNER
]


def _constructed_names() -> set[str]:
    """Names called anywhere in the shipped packages outside core/errors.py (``X(...)``)."""
    names: set[str] = set()
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "core" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    func = node.func
                    if isinstance(func, ast.Name):
                        names.add(func.id)
                    elif isinstance(func, ast.Attribute):
                        names.add(func.attr)
    return names


def test_every_error_class_is_raised_somewhere():
    """No class of the tree is only documented: each leaf is built by the code that ships."""
    constructed = _constructed_names()
    missing = [cls.__name__ for cls in ERROR_CLASSES if cls.__name__ not in constructed]
    assert missing == []


def test_the_documented_tree_names_exactly_the_classes():
    """The tree drawn in docs/architecture.md ("Errors") lists every class, and nothing else."""
    drawn = set(re.findall(r"[├└]── (\w+)", (ROOT / "docs" / "architecture.md").read_text())) | {"IngestError"}
    defined = {cls.__name__ for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, IngestError)}
    assert drawn == defined


def test_codes_are_unique():
    """Each class has its own code (HTTP bodies, parked reasons and metrics labels tell them apart)."""
    codes = [cls.code for cls in [*ERROR_CLASSES, *INNER]]
    assert len(codes) == len(set(codes))


def _instance(cls: type[IngestError]) -> IngestError:
    if cls is errors.SmartcarRejected:
        return errors.SmartcarRejected("refused", 403, None, None)
    return cls("message")


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_each_error_maps_to_its_exit_status(cls):
    """Bad settings 2, outages 3, Smartcar refusing us 4, every other permanent failure 1."""
    status = cli_main.exit_status(_instance(cls))
    if issubclass(cls, ConfigurationError):
        assert status == cli_main.EXIT_USAGE == 2
    elif issubclass(cls, TransientError):
        assert status == cli_main.EXIT_UNAVAILABLE == 3
    elif cls in (errors.TokenRequestFailed, errors.SmartcarUnauthorized, errors.SmartcarRejected):
        assert status == cli_main.EXIT_REFUSED == 4
    else:
        assert status == cli_main.EXIT_FAILED == 1


def test_readme_documents_every_exit_status():
    """The README's exit-code table lists exactly the statuses cli.main can return."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)}
    statuses = {value for name, value in vars(cli_main).items() if name.startswith("EXIT_")}
    assert documented == statuses == {0, 1, 2, 3, 4, 130}


# --- the job argument ------------------------------------------------------------------------------


def test_a_job_payload_is_read_by_its_keys():
    """The payload the web writes reads back as itself; keys beyond the four are dropped."""
    payload = job_payload("evt-1", "VEHICLE_STATE", '{"a": 1}', 1_700_000_000_000)
    assert read_payload(payload) == payload
    assert read_payload({**payload, "addedLater": True}) == payload


@pytest.mark.parametrize(
    ("value", "wrong"),
    [
        ({}, "eventId is missing"),
        ({"eventId": "evt-1", "eventType": "VEHICLE_STATE", "body": "{}"}, "receivedAt"),
        ({"eventId": "", "eventType": "VEHICLE_STATE", "body": "{}", "receivedAt": 1}, "eventId is empty"),
        ({"eventId": "evt-1", "eventType": "VEHICLE_STATE", "body": {"vin": "SECRETVIN"}, "receivedAt": 1}, "body"),
        ({"eventId": "evt-1", "eventType": "VEHICLE_STATE", "body": "{}", "receivedAt": True}, "receivedAt"),
        ({"eventId": "evt-1", "eventType": "VEHICLE_STATE", "body": "{}", "receivedAt": -5}, "receivedAt"),
    ],
)
def test_a_malformed_job_argument_is_refused_by_name(value, wrong):
    """Each malformed shape is InvalidJob naming what is wrong, never quoting a value."""
    with pytest.raises(InvalidJob) as caught:
        read_payload(value)
    assert wrong in caught.value.message
    assert "SECRETVIN" not in caught.value.message
    assert isinstance(caught.value, PermanentError)


def test_a_malformed_job_fails_at_once_without_retries(pipeline, redis_client):
    """A process_event job whose argument is not a job payload is failed on its first run, its retries
    unspent, with a reason an operator can read; the genuine job queued after it is published."""
    queue = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    malformed = queue.enqueue(PROCESS_EVENT, {"eventId": "evt-malformed"}, retry=Retry(max=3, interval=60))
    event = sample_event()
    queue.enqueue(PROCESS_EVENT, job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
    run_worker_burst(pipeline)
    job = Job.fetch(malformed.id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert job.id in FailedJobRegistry(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    assert "Refused by smartcar-ingest: the job's argument is not a job payload" in job.latest_result().exc_string
    scheduled = ScheduledJobRegistry(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    assert scheduled.count == 0  # no retry scheduled
    assert [entry["event_id"] for entry in outputs(redis_client)] == [event["eventId"]]


# --- a stock RQ worker ------------------------------------------------------------------------------


def test_a_job_run_by_a_stock_rq_worker_fails_with_the_reason(pipeline, redis_client):
    """RQ's stock worker fails the job saying which command runs jobs."""
    event = sample_event()
    queue = Queue(pipeline.ingest_queue, connection=redis_client, serializer=JSONSerializer)
    job = queue.enqueue(PROCESS_EVENT, job_payload(event["eventId"], "VEHICLE_STATE", encode(event).decode(), 0))
    connection = redis.Redis.from_url(pipeline.redis_url)
    try:
        SimpleWorker([queue], connection=connection, serializer=JSONSerializer).work(burst=True)
    finally:
        connection.close()
    job = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert "ingest jobs run under `smartcar-ingest worker`" in job.latest_result().exc_string
    assert outputs(redis_client) == []
