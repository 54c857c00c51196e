"""docs/openapi.yaml and docs/openapi-admin.yaml: valid OpenAPI 3.1 documents that describe exactly
what the web process serves, one document per port.

Validity is checked offline: each document against the OpenAPI 3.1 meta-schema that Schemathesis
ships, every Schema Object in it against JSON Schema 2020-12's, every ``$ref`` against its
target, and every example against its schema. Agreement is checked both ways against the route
tables of the real apps (the public app and the admin app that ``smartcar-ingest web`` serves),
against the statuses and error codes the endpoints' source writes, and over real HTTP for the
methods a path does not declare (405 with ``Allow``, never 404).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import SecretStr
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.applications import Starlette
from starlette.routing import Route

from core.config import Settings
from core.events.parse import parse_document
from service.app import create_admin_app, create_app
from service.responses import error_body
from tests.conftest import TOKEN
from tests.procs import LiveServer

ROOT = Path(__file__).resolve().parent.parent
#: One document per port, so that a tool pointed at a port with its document tests only what that
#: port serves (Schemathesis' CLI sends every operation to ``--url``, whatever ``servers`` says).
DOCUMENTS = {"public": ROOT / "docs" / "openapi.yaml", "admin": ROOT / "docs" / "openapi-admin.yaml"}
PORTS = tuple(DOCUMENTS)
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
#: Methods no route declares, sent to every documented path: OpenAPI's, and one of WebDAV's.
UNDECLARED_PROBES = ("GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE", "PROPFIND")


def doc_uri(port: str) -> str:
    """The document of ``port`` as a resource that ``$ref``s resolve in: ``<uri>#/components/...``."""
    return f"urn:smartcar-ingest:openapi:{port}"


@functools.cache
def document(port: str = "public") -> dict[str, Any]:
    loaded = yaml.safe_load(DOCUMENTS[port].read_text())
    assert isinstance(loaded, dict)
    return loaded


def registry(port: str = "public") -> Registry[Any]:
    return Registry().with_resource(
        doc_uri(port), Resource.from_contents(document(port), default_specification=DRAFT202012)
    )


def validator(pointer: str, port: str = "public") -> Draft202012Validator:
    """A validator for the schema at ``pointer`` (``#/components/schemas/Delivery``), refs resolved in the document."""
    return Draft202012Validator({"$ref": doc_uri(port) + pointer}, registry=registry(port))


def walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) in the document, depth first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, str(index)))


def schema_objects(port: str) -> Iterator[tuple[str, Any]]:
    """Every Schema Object at the top of its tree: components, parameters, headers and media types."""
    for path, node in walk(document(port)):
        if isinstance(node, dict) and path and path[-1] == "schema" and "examples" not in path:
            yield "/".join(path), node
    for name, schema in document(port)["components"]["schemas"].items():
        yield f"components/schemas/{name}", schema


def operations(port: str | None = None) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(port, path, METHOD, operation) for every operation of ``port``'s document, or of both."""
    for name in PORTS if port is None else (port,):
        for path, item in document(name)["paths"].items():
            for method in HTTP_METHODS:
                if method in item:
                    yield name, path, method.upper(), item[method]


# --- the documents are valid -----------------------------------------------------------------


@pytest.mark.parametrize("port", PORTS)
def test_document_is_valid_openapi_3_1(port):
    """The document passes the OpenAPI 3.1 meta-schema (2022-10-07, as Schemathesis ships it)."""
    assert document(port)["openapi"].startswith("3.1.")
    errors = sorted(Draft202012Validator(OPENAPI_31).iter_errors(document(port)), key=lambda e: list(e.absolute_path))
    assert [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors] == []


@pytest.mark.parametrize("port", PORTS)
def test_every_schema_is_valid_json_schema_2020_12(port):
    """OpenAPI 3.1's meta-schema leaves Schema Objects unchecked; JSON Schema's own meta-schema checks each."""
    problems = []
    for where, schema in schema_objects(port):
        problems += [
            f"{where}: {error.message}"
            for error in Draft202012Validator(Draft202012Validator.META_SCHEMA).iter_errors(schema)
        ]
    assert problems == []


@pytest.mark.parametrize("port", PORTS)
def test_every_reference_resolves(port):
    """Each ``$ref`` names something that exists in the same document (each document stands alone)."""
    resolver = registry(port).resolver(doc_uri(port))
    refs = [
        node["$ref"] for _, node in walk(document(port)) if isinstance(node, dict) and isinstance(node.get("$ref"), str)
    ]
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        assert resolver.lookup(doc_uri(port) + ref).contents is not None, ref


def pointer(path: tuple[str, ...]) -> str:
    """The JSON pointer fragment of a path in the document (``/`` in a name escaped as ``~1``)."""
    return "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in path)


@pytest.mark.parametrize(("port", "at_least"), [("public", 8), ("admin", 2)])
def test_examples_match_their_schemas(port, at_least):
    """Every example of a request or response body validates against the schema beside it."""
    lookup = registry(port).resolver(doc_uri(port)).lookup
    checked = 0
    for path, node in walk(document(port)):
        if not (isinstance(node, dict) and "schema" in node and ("example" in node or "examples" in node)):
            continue
        values = [node["example"]] if "example" in node else []
        for example in node.get("examples", {}).values():
            values.append(
                lookup(doc_uri(port) + example["$ref"]).contents["value"] if "$ref" in example else example["value"]
            )
        check = validator(pointer((*path, "schema")), port)
        for value in values:
            assert [error.message for error in check.iter_errors(value)] == [], (path, value)
            checked += 1
    assert checked >= at_least


@pytest.mark.parametrize("name", ["VehicleStateDelivery", "VehicleStateReferenceDelivery", "VehicleErrorDelivery"])
def test_delivery_examples_are_events_the_service_accepts(name):
    """The documented deliveries are real ones: the service's own parser reads each as a vehicle event."""
    value = document()["components"]["examples"][name]["value"]
    event = parse_document(value)
    assert (event.event_id, event.event_type) == (value["eventId"], value["eventType"])


def test_verify_example_is_a_verify():
    """The documented VERIFY is read as one and carries a token-like challenge (answered even unsigned)."""
    value = document()["components"]["examples"]["VerifyDelivery"]["value"]
    challenge = parse_document(value)
    assert isinstance(challenge, str)
    assert re.fullmatch(r"[A-Za-z0-9._~-]{1,256}", challenge)


def webhook_operation() -> dict[str, Any]:
    operation = document()["paths"]["/webhooks/smartcar"]["post"]
    assert isinstance(operation, dict)
    return operation


def test_any_sc_signature_value_or_none_is_a_well_formed_request():
    """The endpoint reads any value, or none, as a signature that matches or not (an unsigned VERIFY with a
    token-like challenge is answered 200): the document constrains neither, so no tool takes a 200 for a
    request it made malformed by changing only the header."""
    (parameter,) = webhook_operation()["parameters"]
    resolved = registry().resolver(doc_uri("public")).lookup(doc_uri("public") + parameter["$ref"]).contents
    assert (resolved["name"], resolved["in"], resolved.get("required", False)) == ("SC-Signature", "header", False)
    check = validator(pointer(("components", "parameters", "ScSignature", "schema")))
    for value in ("", "not-hex", "0" * 63, "A" * 64, "sha256=" + "0" * 64, resolved["example"]):
        assert list(check.iter_errors(value)) == [], value


def test_the_webhook_takes_any_json_object_and_only_objects():
    """A validly signed JSON object is answered 2xx whatever its fields (accepted, a VERIFY answer, or parked),
    and a scalar or array is refused 400 `not_an_object`: the request body's schema says exactly that, while
    the delivery shapes stay documented beside it."""
    content = webhook_operation()["requestBody"]["content"]["application/json"]
    check = validator(
        pointer(("paths", "/webhooks/smartcar", "post", "requestBody", "content", "application/json", "schema"))
    )
    for value in (
        {},
        {"eventType": "VERIFY", "data": {"challenge": ""}},
        {"eventId": 7},
        {"meta": {"deliveredAt": {}}},
    ):
        assert list(check.iter_errors(value)) == [], value
    for value in ([], [{}], "VERIFY", 1, None, True):
        assert list(check.iter_errors(value)) != [], value
    refs = {node["$ref"] for _, node in walk(content["schema"]) if isinstance(node, dict) and "$ref" in node}
    assert "#/components/schemas/Delivery" in refs


def test_each_document_names_its_port_and_the_default():
    """Each document's one server is its port, with the default the web uses; no path or operation
    sends a tool elsewhere (Schemathesis' CLI would ignore it and send the path to ``--url``)."""
    public, admin = document("public")["servers"], document("admin")["servers"]
    assert len(public) == len(admin) == 1
    assert public[0]["url"] == "http://{host}:{port}"
    assert int(public[0]["variables"]["port"]["default"]) == 8000
    assert admin[0]["url"] == "http://{host}:{adminPort}"
    assert int(admin[0]["variables"]["adminPort"]["default"]) == Settings.model_fields["admin_port"].default
    for port in PORTS:
        for path, item in document(port)["paths"].items():
            assert "servers" not in item, (port, path)
            assert all("servers" not in item[method] for method in HTTP_METHODS if method in item), (port, path)


def test_no_path_is_in_both_documents():
    assert set(document("public")["paths"]).isdisjoint(document("admin")["paths"])


def test_components_in_both_documents_are_the_same():
    """The admin document repeats what it shares with the public one (the error shape, the server's own
    answers): each component in both is identical, so the two cannot drift apart."""
    shared = 0
    for kind, components in document("admin")["components"].items():
        for name, value in components.items():
            if name in document("public")["components"].get(kind, {}):
                assert value == document("public")["components"][kind][name], f"components/{kind}/{name}"
                shared += 1
    assert shared >= 4


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
    """Each port's routes (path and method) and the operations of that port's document agree, both ways."""
    documented: dict[str, set[tuple[str, str]]] = {"public": set(), "admin": set()}
    for port, path, method, _ in operations():
        documented[port].add((path, method))
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
    ``_Unreadable``, ``error_response``) in ``module``, by the name of the function that writes it."""
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
                name in {"_reject", "_error", "_Unreadable", "error_response"}
                and isinstance(status, ast.Constant)
                and isinstance(status.value, int)
                and isinstance(code, ast.Constant)
                and isinstance(code.value, str)
            ):
                found.setdefault(function.name, set()).add((status.value, code.value))
    return found


def errors_by_operation() -> dict[tuple[str, str, str], set[tuple[int, str]]]:
    """What each operation can answer: its endpoint's own errors, and the app-wide ones of service/responses.py."""
    webhook, callback, start = ("/webhooks/smartcar", "post"), ("/connect/callback", "get"), ("/connect/start", "get")
    written: dict[tuple[str, str], set[tuple[int, str]]] = {webhook: set(), callback: set(), start: set()}
    for errors in written_errors("service/webhooks.py").values():
        written[webhook] |= errors
    for function, errors in written_errors("service/connect.py").items():
        written[start if function == "start" else callback] |= errors
    everywhere = set().union(*written_errors("service/responses.py").values())
    return {
        (port, path, method): written.get((path, method.lower()), set()) | everywhere
        for port, path, method, _ in operations()
    }


def test_every_error_an_endpoint_writes_is_documented():
    """Each literal (status, code) an operation can answer has that status documented, naming the code."""
    expected = errors_by_operation()
    assert ("public", "/webhooks/smartcar", "POST") in expected
    assert (503, "internal_error") in expected["public", "/healthz", "GET"]
    assert (503, "internal_error") in expected["admin", "/readyz", "GET"]
    missing = []
    for (port, path, method), errors in sorted(expected.items()):
        responses = document(port)["paths"][path][method.lower()]["responses"]
        for status, code in sorted(errors):
            response = responses.get(str(status))
            if response is not None and "$ref" in response:
                response = registry(port).resolver(doc_uri(port)).lookup(doc_uri(port) + response["$ref"]).contents
            if response is None or f"`{code}`" not in response["description"]:
                missing.append(f"{port}: {method} {path}: {status} {code}")
    assert missing == []


# --- methods a path does not declare, over real HTTP -----------------------------------------


@pytest.fixture
def served(settings: Settings) -> Iterator[dict[str, str]]:
    """Both apps served by uvicorn over real HTTP (Redis from the session's server), /connect/start on."""
    settings = settings.model_copy(
        update={
            "connect_start_enabled": True,
            "connect_redirect_uri": "http://127.0.0.1:8000/connect/callback",
            "smartcar_application_id": "openapi-test-application",
        }
    )
    with LiveServer(create_app(settings)) as public, LiveServer(create_admin_app(settings)) as admin:
        yield {"public": public.url, "admin": admin.url}


def test_undeclared_methods_on_every_documented_path_answer_405_with_allow(served):
    """TRACE, PUT, DELETE, … on a path of a port's document: 405 naming the declared methods in ``Allow``
    (and HEAD beside GET), in the contract's error shape; never 404, never the endpoint itself. The
    webhook's POST skips Starlette (service/app.py ``IngestApp``): its other methods are covered too."""
    error = validator("#/components/schemas/Error")
    answered = 0
    with httpx.Client(timeout=10) as client:
        for port in PORTS:
            for path, item in document(port)["paths"].items():
                declared = {method.upper() for method in HTTP_METHODS if method in item}
                allowed = declared | ({"HEAD"} if "GET" in declared else set())
                for method in sorted(set(UNDECLARED_PROBES) - allowed):
                    response = client.request(method, served[port] + path)
                    what = f"{method} {path} on the {port} port"
                    assert response.status_code == 405, (what, response.status_code, response.text)
                    assert set(response.headers["allow"].replace(" ", "").split(",")) == allowed, what
                    assert response.headers["content-type"] == "application/json", what
                    body = response.json()
                    assert list(error.iter_errors(body)) == [], (what, body)
                    assert body == error_body("method_not_allowed", "Method Not Allowed."), what
                    answered += 1
    paths = sum(len(document(port)["paths"]) for port in PORTS)
    assert paths == 6
    assert answered == 7 * paths  # each path: the 8 probes less its one declared method


def test_a_path_of_the_other_port_is_not_found_there(served):
    """Each port answers 404 for the other's paths, whatever the method: they are not served there."""
    with httpx.Client(timeout=10) as client:
        for port, other in (("public", "admin"), ("admin", "public")):
            for path in document(other)["paths"]:
                for method in ("GET", "POST", "TRACE"):
                    response = client.request(method, served[port] + path)
                    assert response.status_code == 404, (method, path, port)
                    assert response.json()["error"]["code"] == "not_found"
