"""The worker's HTTP client (core/smartcar/http.py) against real sockets: answers, kept connections,
failures, timeouts, hostile answers and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.errors import SmartcarUnavailable
from core.smartcar import http as http_module
from core.smartcar.http import LeanHttp, observed
from tests.procs import free_port

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler, tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int, list[int]]:
    """A local server; the list counts the connections it took."""
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0, ssl=tls)
    return server, server.sockets[0].getsockname()[1], connections


@contextlib.asynccontextmanager
async def _served(handler: Handler, http: LeanHttp | None = None) -> AsyncIterator[tuple[LeanHttp, int, list[int]]]:
    """A client (``http``, by default a new one) and a local server running ``handler``: the client, the
    server's port and its connection count; both closed after."""
    server, port, connections = await _serve(handler)
    client = http or LeanHttp()
    try:
        yield client, port, connections
    finally:
        await client.aclose()
        server.close()


async def _answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = OK) -> None:
    """Answer every request on the connection with ``answer`` (requests without a body)."""
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()


async def _answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(answer)
    await writer.drain()


def test_answers_carry_status_headers_and_json(emulator):
    """A form POST to the emulator's token endpoint: status, headers (names in lower case) and JSON."""

    async def scenario() -> tuple[int, str, object]:
        http = LeanHttp()
        try:
            token = await http.request(
                "POST",
                f"{emulator}/oauth2/token",
                data={"grant_type": "client_credentials", "client_id": "nope", "client_secret": "nope"},
                headers={"accept": "application/json"},
            )
            return token.status_code, token.headers.get("content-type", ""), token.json()
        finally:
            await http.aclose()

    status, content_type, body = asyncio.run(scenario())
    assert status == 401
    assert content_type.startswith("application/json")
    assert isinstance(body, dict)


def test_the_url_goes_as_given_and_the_params_are_encoded():
    """A path the caller quoted (a ``links.next`` from Smartcar) is not quoted again."""

    async def scenario() -> bytes:
        seen: list[bytes] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(OK)
            await writer.drain()

        async with _served(answer) as (http, port, _):
            reply = await http.request(
                "GET",
                f"http://user:secret@127.0.0.1:{port}/v3/vehicles/a%2Fb/signals?x=1",
                params={"page[size]": "100"},
                headers={"sc-user-id": "u-1"},
            )
            assert reply.json() == {}
        return seen[0]

    head = asyncio.run(scenario())
    assert head.startswith(b"GET /v3/vehicles/a%2Fb/signals?x=1&page%5Bsize%5D=100 HTTP/1.1\r\n")
    assert b"\r\nsc-user-id: u-1\r\n" in head
    assert b"secret" not in head  # the URL's credentials never go into the Host header


def test_connections_are_kept_and_reused():
    async def scenario() -> list[int]:
        async with _served(_answer_each) as (http, port, connections):
            for _ in range(3):
                assert (await http.request("GET", f"http://127.0.0.1:{port}/a")).status_code == 200
            await asyncio.gather(*(http.request("GET", f"http://127.0.0.1:{port}/b") for _ in range(4)))
        return connections

    # Three in turn share one; four at once need four (the kept one and three more).
    assert len(asyncio.run(scenario())) == 4


def test_a_kept_connection_the_server_dropped_is_replaced_once():
    """A server that closes each connection after one answer, without saying so: the next request
    finds its kept connection dead, and goes again on a new one."""

    async def scenario() -> list[int]:
        async with _served(lambda r, w: _answer_once(r, w, OK)) as (http, port, connections):
            for _ in range(3):
                reply = await http.request("GET", f"http://127.0.0.1:{port}/")
                assert reply.status_code == 200
                # The answer arrives before the close: sometimes the client sees the close before
                # it reuses the connection, sometimes only when it sends on it; both must work.
                await asyncio.sleep(0)
        return connections

    assert len(asyncio.run(scenario())) == 3


async def _requests(handler: Handler, count: int, method: str = "GET") -> tuple[list[object], int]:
    """``count`` requests in turn to a server running ``handler``: each answer's JSON (or the error it
    raised), and how many connections the server took."""
    outcomes: list[object] = []
    async with _served(handler) as (http, port, connections):
        for _ in range(count):
            try:
                outcomes.append((await http.request(method, f"http://127.0.0.1:{port}/")).json())
            except OSError as exc:
                outcomes.append(type(exc))
    return outcomes, len(connections)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # says close: not kept; chunked: read whole, its trailers not taken for headers
        (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
            b'5\r\n{"a":\r\n2\r\n1}\r\n0\r\nretry-after: 9\r\n\r\n',
            ([{"a": 1}, {"a": 1}], 2),
        ),
        # interim answers before the final one: skipped, and the connection kept
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + OK, ([{}, {}], 1)),
        # a second answer nobody asked for, whole or in part, in the same packet: never handed to the next
        # request (the connection that spoke out of turn is dropped)
        (OK + b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"x":1}', ([{}, {}], 2)),
        (OK + b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"x":', ([{}, {}], 2)),
    ],
)
def test_what_a_connection_carries_is_read_as_one_answer_per_request(answer, expected):
    assert asyncio.run(_requests(lambda r, w: _answer_each(r, w, answer), 2)) == expected


def test_an_answer_ended_by_its_connection_is_whole():
    """No length and no chunks (HTTP/1.0 style): the body is what came before the close."""
    answer = b'HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{"b":2}'
    assert asyncio.run(_requests(lambda r, w: _answer_once(r, w, answer), 2)) == ([{"b": 2}, {"b": 2}], 2)


def test_a_post_is_never_sent_twice():
    """A kept connection dropped by the server is replaced for a GET, not for a POST (it may have
    been taken): the POST fails and the next request goes on a new connection."""
    outcomes, connections = asyncio.run(_requests(lambda r, w: _answer_once(r, w, OK), 3, method="POST"))
    assert outcomes[0] == {}
    assert connections >= 2
    assert {} in outcomes[1:] or http_module.AnswerUnreadable in outcomes[1:]


def test_a_kept_connection_idle_too_long_is_not_reused(monkeypatch):
    monkeypatch.setattr(http_module, "KEEP_IDLE_SECONDS", -1.0)
    assert asyncio.run(_requests(_answer_each, 3)) == ([{}, {}, {}], 3)


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP ready\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}",  # closed before the whole body
        b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b" " * 5000,  # larger than allowed (below)
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"2\r\nab\r\n" * 3000,  # chunks past it
        b"HTTP/1.1 200 OK\r\n" + b"x-filler: 0123456789abcdef\r\n" * 3000,  # a head past its limit
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ],
)
def test_a_hostile_answer_is_a_transport_error_never_a_crash(monkeypatch, answer):
    monkeypatch.setattr(http_module, "MAX_ANSWER_BYTES", 4096)
    monkeypatch.setattr(http_module, "MAX_HEAD_BYTES", 8192)

    async def scenario() -> None:
        async with _served(lambda r, w: _answer_once(r, w, answer)) as (http, port, _):
            await observed("vehicle", http.request("GET", f"http://127.0.0.1:{port}/"))

    with pytest.raises(SmartcarUnavailable, match="could not be reached"):
        asyncio.run(scenario())


@pytest.mark.parametrize(
    "headers",
    [{"sc-user-id": "u\r\nx-injected: 1"}, {"sc-user-id": "u\nx"}, {"sc-user-id": "u\0"}, {"x-\r\nname": "v"}],
)
def test_a_header_that_would_split_the_request_is_refused_before_anything_is_sent(headers):
    async def scenario() -> list[int]:
        async with _served(_answer_each) as (http, port, connections):
            with pytest.raises(ValueError, match=r"CR, LF or NUL"):
                await http.request("GET", f"http://127.0.0.1:{port}/v3/x", headers=headers)
            with pytest.raises(ValueError, match="http and https"):
                await http.request("GET", f"ftp://127.0.0.1:{port}/")
            await asyncio.sleep(0.05)
        return connections

    assert asyncio.run(scenario()) == []


def test_a_target_with_spaces_or_line_breaks_is_percent_encoded_not_split():
    """A path from elsewhere (a ``links.next``) cannot smuggle a second request: line breaks are
    dropped (as ``urlsplit`` does), anything else outside a target's characters percent-encoded."""

    async def scenario() -> list[bytes]:
        seen: list[bytes] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                seen.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(OK)
                await writer.drain()

        async with _served(answer) as (http, port, _):
            await http.request("GET", f"http://127.0.0.1:{port}/v3/a b?x=1 HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /é")
            await http.request("GET", f"http://127.0.0.1:{port}/v3/ok")
        return seen

    first, second = asyncio.run(scenario())
    assert first.startswith(b"GET /v3/a%20b?x=1%20HTTP/1.1x-injected:%201GET%20/%C3%A9 HTTP/1.1\r\n")
    assert b"\r\nx-injected" not in first
    assert second.startswith(b"GET /v3/ok HTTP/1.1\r\n")


def test_a_closed_port_is_a_transport_error():
    async def scenario() -> None:
        http = LeanHttp()
        try:
            await http.request("GET", f"http://127.0.0.1:{free_port()}/v3/vehicles/x")
        finally:
            await http.aclose()

    with pytest.raises(ConnectionRefusedError):
        asyncio.run(scenario())


def test_a_server_that_never_answers_is_a_timeout_and_a_cancelled_request_drops_its_connection():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client closes

    async def scenario() -> list[int]:
        async with _served(silent, LeanHttp(timeout_seconds=0.3)) as (http, port, connections):
            with pytest.raises(TimeoutError):
                await http.request("GET", f"http://127.0.0.1:{port}/")
            request = asyncio.ensure_future(http.request("GET", f"http://127.0.0.1:{port}/"))
            await asyncio.sleep(0.05)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            assert http._idle.get(("http", "127.0.0.1", port), []) == []
        return connections

    assert len(asyncio.run(scenario())) == 2


def test_a_request_cancelled_as_its_answer_lands_closes_its_connection():
    """Cancelled in the same turn of the loop as its answer arrives (the job's own time budget, say):
    the connection is neither kept nor left open."""

    async def scenario() -> None:
        async with _served(_answer_each) as (http, port, _):
            await http.request("GET", f"http://127.0.0.1:{port}/")  # a kept connection
            (connection,) = http._idle[("http", "127.0.0.1", port)]
            request = asyncio.ensure_future(http.request("GET", f"http://127.0.0.1:{port}/"))
            await asyncio.sleep(0)  # the request runs to its wait for the answer
            assert connection.answer is not None
            connection.answer.set_result(http_module.Answer(200, {}, b"{}"))
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            assert connection.transport.is_closing()
            assert http._idle[("http", "127.0.0.1", port)] == []

    asyncio.run(scenario())


def test_a_request_under_way_at_aclose_is_not_kept_and_the_client_serves_a_later_loop():
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.1)
            writer.write(OK)
            await writer.drain()

    http = LeanHttp()

    async def first_loop() -> None:
        server, port, _ = await _serve(slow)
        try:
            request = asyncio.ensure_future(http.request("GET", f"http://127.0.0.1:{port}/"))
            await asyncio.sleep(0.02)
            await http.aclose()
            assert (await request).status_code == 200
            assert all(not kept for kept in http._idle.values())
            await http.request("GET", f"http://127.0.0.1:{port}/")  # kept, then left behind by this loop
        finally:
            server.close()

    async def second_loop() -> int:
        async with _served(_answer_each, http) as (_, port, _):
            return (await http.request("GET", f"http://127.0.0.1:{port}/")).status_code

    asyncio.run(first_loop())
    assert asyncio.run(second_loop()) == 200


def _self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting only it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return server, ssl.create_default_context(cafile=str(directory / "cert.pem"))


def test_https_is_verified(tmp_path):
    """Over TLS with a trusted certificate the answer is read; the default authorities refuse a
    self-signed one (a verification failure is a transport error)."""
    server_tls, client_tls = _self_signed(tmp_path)

    async def scenario() -> None:
        server, port, _ = await _serve(_answer_each, server_tls)
        trusted, default = LeanHttp(tls=client_tls), LeanHttp()
        try:
            assert (await trusted.request("GET", f"https://127.0.0.1:{port}/")).json() == {}
            assert (await trusted.request("GET", f"https://127.0.0.1:{port}/")).json() == {}
            with pytest.raises(ssl.SSLCertVerificationError):
                await default.request("GET", f"https://127.0.0.1:{port}/")
        finally:
            await trusted.aclose()
            await default.aclose()
            server.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("variable", "proxy"), [(None, None), ("HTTPS_PROXY", "http://proxy.internal:3128"), ("NO_PROXY", None)]
)
def test_proxies_come_from_the_environment_as_with_httpx(monkeypatch, variable, proxy):
    """An HTTPS_PROXY is honoured (the requests go through aiohttp, which reads it); without one (a
    NO_PROXY alone names none) they go on the client's own connections."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    if variable:
        monkeypatch.setenv(variable, proxy or "internal.example")

    async def scenario() -> bool:
        http = LeanHttp()
        try:
            with contextlib.suppress(OSError, Exception):  # the client opens on the first request
                await http.request("GET", f"https://127.0.0.1:{free_port()}/")
            return http._proxied is not None and http._proxied.trust_env
        finally:
            await http.aclose()

    assert asyncio.run(scenario()) is bool(proxy)
