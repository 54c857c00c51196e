"""docs/openapi.yaml: a valid OpenAPI 3.1 document that describes exactly what the web process serves.

Validity is checked offline: the document against the OpenAPI 3.1 meta-schema that Schemathesis
ships, every Schema Object in it against JSON Schema 2020-12's, every ``$ref`` against its
target, and every example against its schema. Agreement is checked both ways against the route
tables of the real apps (the public app and the admin app that ``smartcar-ingest web`` serves),
and against the statuses and error codes the endpoints' source writes.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import SecretStr
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.applications import Starlette
from starlette.routing import Route

from core import events
from core.config import Settings
from service.admin import create_admin_app
from service.app import create_app
from tests.conftest import TOKEN

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
#: The document as a resource that ``$ref``s resolve in: ``DOC_URI#/components/...``.
DOC_URI = "urn:smartcar-ingest:openapi"


@functools.cache
def document() -> dict[str, Any]:
    loaded = yaml.safe_load(DOCUMENT.read_text())
    assert isinstance(loaded, dict)
    return loaded


def registry() -> Registry[Any]:
    return Registry().with_resource(DOC_URI, Resource.from_contents(document(), default_specification=DRAFT202012))


def validator(pointer: str) -> Draft202012Validator:
    """A validator for the schema at ``pointer`` (``#/components/schemas/Delivery``), refs resolved in the document."""
    return Draft202012Validator({"$ref": DOC_URI + pointer}, registry=registry())


def walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) in the document, depth first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, str(index)))


def schema_objects() -> Iterator[tuple[str, Any]]:
    """Every Schema Object at the top of its tree: components, parameters, headers and media types."""
    for path, node in walk(document()):
        if isinstance(node, dict) and path and path[-1] == "schema" and "examples" not in path:
            yield "/".join(path), node
    for name, schema in document()["components"]["schemas"].items():
        yield f"components/schemas/{name}", schema


def operations() -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(path, METHOD, path item, operation) for every operation in the document."""
    for path, item in document()["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method.upper(), item, item[method]


def port_of(path_item: dict[str, Any]) -> str:
    """``admin`` for a path served on ``ADMIN_PORT`` (its own server, naming ``adminPort``), else ``public``."""
    servers = path_item.get("servers")
    return "admin" if servers and "{adminPort}" in servers[0]["url"] else "public"


# --- the document is valid -------------------------------------------------------------------


def test_document_is_valid_openapi_3_1():
    """The document passes the OpenAPI 3.1 meta-schema (2022-10-07, as Schemathesis ships it)."""
    assert document()["openapi"].startswith("3.1.")
    errors = sorted(Draft202012Validator(OPENAPI_31).iter_errors(document()), key=lambda e: list(e.absolute_path))
    assert [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors] == []


def test_every_schema_is_valid_json_schema_2020_12():
    """OpenAPI 3.1's meta-schema leaves Schema Objects unchecked; JSON Schema's own meta-schema checks each."""
    problems = []
    for where, schema in schema_objects():
        problems += [
            f"{where}: {error.message}"
            for error in Draft202012Validator(Draft202012Validator.META_SCHEMA).iter_errors(schema)
        ]
    assert problems == []


def test_every_reference_resolves():
    """Each ``$ref`` names something that exists in the document."""
    resolver = registry().resolver(DOC_URI)
    refs = [
        node["$ref"] for _, node in walk(document()) if isinstance(node, dict) and isinstance(node.get("$ref"), str)
    ]
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        assert resolver.lookup(DOC_URI + ref).contents is not None, ref


def pointer(path: tuple[str, ...]) -> str:
    """The JSON pointer fragment of a path in the document (``/`` in a name escaped as ``~1``)."""
    return "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in path)


def test_examples_match_their_schemas():
    """Every example of a request or response body validates against the schema beside it."""
    lookup = registry().resolver(DOC_URI).lookup
    checked = 0
    for path, node in walk(document()):
        if not (isinstance(node, dict) and "schema" in node and ("example" in node or "examples" in node)):
            continue
        values = [node["example"]] if "example" in node else []
        for example in node.get("examples", {}).values():
            values.append(
                lookup(DOC_URI + example["$ref"]).contents["value"] if "$ref" in example else example["value"]
            )
        check = validator(pointer((*path, "schema")))
        for value in values:
            assert [error.message for error in check.iter_errors(value)] == [], (path, value)
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("name", ["VehicleStateDelivery", "VehicleStateReferenceDelivery", "VehicleErrorDelivery"])
def test_delivery_examples_are_events_the_service_accepts(name):
    """The documented deliveries are real ones: the service's own parser reads each as a vehicle event."""
    value = document()["components"]["examples"][name]["value"]
    event = events.parse_event(value)
    assert (event.event_id, event.event_type) == (value["eventId"], value["eventType"])


def test_verify_example_is_a_verify():
    """The documented VERIFY is classified as one and carries a token-like challenge (answered even unsigned)."""
    value = document()["components"]["examples"]["VerifyDelivery"]["value"]
    assert events.classify(value) == events.VERIFY
    assert re.fullmatch(r"[A-Za-z0-9._~-]{1,256}", events.parse_verify(value))


def test_admin_paths_name_the_admin_port_and_its_default():
    """Paths served on ADMIN_PORT carry the same admin server, whose default port is the setting's default."""
    admin_servers = [item["servers"] for path, item in document()["paths"].items() if "servers" in item]
    assert admin_servers
    assert all(servers == admin_servers[0] for servers in admin_servers)
    default = admin_servers[0][0]["variables"]["adminPort"]["default"]
    assert int(default) == Settings.model_fields["admin_port"].default


# --- the document describes exactly what is served ------------------------------------------


def served_routes(app: Starlette) -> set[tuple[str, str]]:
    """(path, METHOD) for each route of ``app``; the HEAD Starlette adds to every GET route is left out."""
    routes = set()
    for route in app.routes:
        assert isinstance(route, Route), f"{route!r}: only plain HTTP routes are documented"
        assert route.methods, f"{route.path} accepts any method"
        methods = set(route.methods)
        if "GET" in methods:
            methods.discard("HEAD")
        routes |= {(route.path, method) for method in methods}
    return routes


@pytest.fixture
def apps() -> dict[str, Starlette]:
    """The apps ``smartcar-ingest web`` serves, with every optional route turned on."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        smartcar_management_token=SecretStr(TOKEN),
        connect_start_enabled=True,
        connect_redirect_uri="http://127.0.0.1:8000/connect/callback",
        smartcar_application_id="openapi-test-application",
    )
    return {"public": create_app(settings), "admin": create_admin_app(settings)}


def test_documented_operations_are_exactly_the_served_routes(apps):
    """Each port's routes (path and method) and the document's operations for that port agree, both ways."""
    documented: dict[str, set[tuple[str, str]]] = {"public": set(), "admin": set()}
    for path, method, item, _ in operations():
        documented[port_of(item)].add((path, method))
    for port, app in apps.items():
        served = served_routes(app)
        assert sorted(served - documented[port]) == [], f"served on the {port} port but not documented"
        assert sorted(documented[port] - served) == [], f"documented for the {port} port but not served"


def test_connect_start_is_served_only_when_enabled():
    """The document says /connect/start answers 404 unless CONNECT_START_ENABLED: the app agrees."""
    settings = Settings(_env_file=None, smartcar_management_token=SecretStr(TOKEN))  # type: ignore[call-arg]
    assert ("/connect/start", "GET") not in served_routes(create_app(settings))
    assert "404" in document()["paths"]["/connect/start"]["get"]["responses"]


def written_errors(module: str) -> dict[str, set[tuple[int, str]]]:
    """(status, code) of every error written with literal values (``_reject``, ``_error``,
    ``error_response``) in ``module``, by the name of the function that writes it."""
    found: dict[str, set[tuple[int, str]]] = {}
    for function in ast.walk(ast.parse((ROOT / module).read_text())):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            status, code = node.args[0], node.args[1]
            if (
                name in {"_reject", "_error", "error_response"}
                and isinstance(status, ast.Constant)
                and isinstance(status.value, int)
                and isinstance(code, ast.Constant)
                and isinstance(code.value, str)
            ):
                found.setdefault(function.name, set()).add((status.value, code.value))
    return found


def errors_by_operation() -> dict[tuple[str, str], set[tuple[int, str]]]:
    """What each operation can answer: its endpoint's own errors, and the app-wide ones of service/responses.py."""
    webhook, callback, start = ("/webhooks/smartcar", "post"), ("/connect/callback", "get"), ("/connect/start", "get")
    written: dict[tuple[str, str], set[tuple[int, str]]] = {webhook: set(), callback: set(), start: set()}
    for errors in written_errors("service/webhooks.py").values():
        written[webhook] |= errors
    for function, errors in written_errors("service/connect.py").items():
        written[start if function == "start" else callback] |= errors
    everywhere = set().union(*written_errors("service/responses.py").values())
    return {
        (path, method): written.get((path, method.lower()), set()) | everywhere for path, method, _, _ in operations()
    }


def test_every_error_an_endpoint_writes_is_documented():
    """Each literal (status, code) an operation can answer has that status documented, naming the code."""
    expected = errors_by_operation()
    assert ("/webhooks/smartcar", "POST") in expected
    assert (503, "internal_error") in expected["/healthz", "GET"]
    missing = []
    for (path, method), errors in sorted(expected.items()):
        responses = document()["paths"][path][method.lower()]["responses"]
        for status, code in sorted(errors):
            response = responses.get(str(status))
            if response is not None and "$ref" in response:
                response = registry().resolver(DOC_URI).lookup(DOC_URI + response["$ref"]).contents
            if response is None or f"`{code}`" not in response["description"]:
                missing.append(f"{method} {path}: {status} {code}")
    assert missing == []
