"""The worker's HTTP client (core/smartcar/http.py) against real sockets: answers, kept connections,
failures, timeouts, hostile answers and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
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

        server, port, _ = await _serve(answer)
        http = LeanHttp()
        try:
            reply = await http.request(
                "GET",
                f"http://user:secret@127.0.0.1:{port}/v3/vehicles/a%2Fb/signals?x=1",
                params={"page[size]": "100"},
                headers={"sc-user-id": "u-1"},
            )
            assert reply.json() == {}
        finally:
            await http.aclose()
            server.close()
        return seen[0]

    head = asyncio.run(scenario())
    assert head.startswith(b"GET /v3/vehicles/a%2Fb/signals?x=1&page%5Bsize%5D=100 HTTP/1.1\r\n")
    assert b"\r\nsc-user-id: u-1\r\n" in head
    assert b"secret" not in head  # the URL's credentials never go into the Host header


def test_connections_are_kept_and_reused():
    async def scenario() -> list[int]:
        server, port, connections = await _serve(_answer_each)
        http = LeanHttp()
        try:
            for _ in range(3):
                assert (await http.request("GET", f"http://127.0.0.1:{port}/a")).status_code == 200
            await asyncio.gather(*(http.request("GET", f"http://127.0.0.1:{port}/b") for _ in range(4)))
        finally:
            await http.aclose()
            server.close()
        return connections

    # Three in turn share one; four at once need four (the kept one and three more).
    assert len(asyncio.run(scenario())) == 4


def test_a_kept_connection_the_server_dropped_is_replaced_once():
    """A server that closes each connection after one answer, without saying so: the next request
    finds its kept connection dead, and goes again on a new one."""

    async def scenario() -> list[int]:
        server, port, connections = await _serve(lambda r, w: _answer_once(r, w, OK))
        http = LeanHttp()
        try:
            for _ in range(3):
                reply = await http.request("GET", f"http://127.0.0.1:{port}/")
                assert reply.status_code == 200
                # The answer arrives before the close: sometimes the client sees the close before
                # it reuses the connection, sometimes only when it sends on it; both must work.
                await asyncio.sleep(0)
        finally:
            await http.aclose()
            server.close()
        return connections

    assert len(asyncio.run(scenario())) == 3


def test_an_answer_that_says_close_is_not_kept_and_chunked_answers_are_read_whole():
    chunked = (
        b'HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n'
    )

    async def scenario() -> tuple[list[object], list[int]]:
        server, port, connections = await _serve(lambda r, w: _answer_each(r, w, chunked))
        http = LeanHttp()
        try:
            bodies = [(await http.request("GET", f"http://127.0.0.1:{port}/")).json() for _ in range(2)]
        finally:
            await http.aclose()
            server.close()
        return bodies, connections

    bodies, connections = asyncio.run(scenario())
    assert bodies == [{"a": 1}, {"a": 1}]
    assert len(connections) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP ready\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}",  # closed before the whole body
        b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b" " * 5000,  # larger than allowed (below)
    ],
)
def test_a_hostile_answer_is_a_transport_error_never_a_crash(monkeypatch, answer):
    monkeypatch.setattr(http_module, "MAX_ANSWER_BYTES", 4096)

    async def scenario() -> None:
        server, port, _ = await _serve(lambda r, w: _answer_once(r, w, answer))
        http = LeanHttp()
        try:
            await observed("vehicle", http.request("GET", f"http://127.0.0.1:{port}/"))
        finally:
            await http.aclose()
            server.close()

    with pytest.raises(SmartcarUnavailable, match="could not be reached"):
        asyncio.run(scenario())


def test_an_answer_nobody_asked_for_never_reaches_the_next_request():
    extra = OK + b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"x":1}'

    async def scenario() -> tuple[list[object], list[int]]:
        server, port, connections = await _serve(lambda r, w: _answer_each(r, w, extra))
        http = LeanHttp()
        try:
            bodies = [(await http.request("GET", f"http://127.0.0.1:{port}/")).json() for _ in range(2)]
        finally:
            await http.aclose()
            server.close()
        return bodies, connections

    bodies, connections = asyncio.run(scenario())
    assert bodies == [{}, {}]
    assert len(connections) == 2  # the connection that spoke out of turn was dropped


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("http://127.0.0.1:{port}/v3/x", {"sc-user-id": "u\r\nx-injected: 1"}),
        ("http://127.0.0.1:{port}/v3/x", {"sc-user-id": "u\nx"}),
        ("http://127.0.0.1:{port}/v3/x", {"sc-user-id": "u\0"}),
        ("http://127.0.0.1:{port}/v3/x HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /", {}),
        ("http://127.0.0.1:{port}/v3/a b", {}),
        ("ftp://127.0.0.1:{port}/", {}),
    ],
)
def test_a_request_that_would_split_is_refused_before_anything_is_sent(url, headers):
    async def scenario() -> list[int]:
        server, port, connections = await _serve(_answer_each)
        http = LeanHttp()
        try:
            with pytest.raises(ValueError, match=r"space, CR, LF or NUL|http and https"):
                await http.request("GET", url.format(port=port), headers=headers)
            await asyncio.sleep(0.05)
        finally:
            await http.aclose()
            server.close()
        return connections

    assert asyncio.run(scenario()) == []


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
        server, port, connections = await _serve(silent)
        http = LeanHttp(timeout_seconds=0.3)
        try:
            with pytest.raises(TimeoutError):
                await http.request("GET", f"http://127.0.0.1:{port}/")
            request = asyncio.ensure_future(http.request("GET", f"http://127.0.0.1:{port}/"))
            await asyncio.sleep(0.05)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            assert http._idle.get(("http", "127.0.0.1", port), []) == []
        finally:
            await http.aclose()
            server.close()
        return connections

    assert len(asyncio.run(scenario())) == 2


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


@pytest.mark.parametrize("proxy", [None, "http://proxy.internal:3128"])
def test_proxies_come_from_the_environment_as_with_httpx(monkeypatch, proxy):
    """An HTTPS_PROXY is honoured (the requests go through aiohttp, which reads it); without one they
    go on the client's own connections."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)

    async def scenario() -> bool:
        http = LeanHttp()
        try:
            with contextlib.suppress(OSError, Exception):  # the client opens on the first request
                await http.request("GET", f"https://127.0.0.1:{free_port()}/")
            return http._proxied is not None and http._proxied.trust_env
        finally:
            await http.aclose()

    assert asyncio.run(scenario()) is bool(proxy)
