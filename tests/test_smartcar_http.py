"""The worker's HTTP client (core/smartcar/http.py) against real sockets: answers, failures, timeouts."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from core.smartcar.http import LeanHttp
from tests.procs import free_port


def test_answers_carry_status_headers_and_json(emulator):
    """A form POST to the emulator's token endpoint: status, headers (any case) and JSON."""

    async def scenario() -> tuple[int, str, object]:
        http = LeanHttp()
        try:
            token = await http.request(
                "POST",
                f"{emulator}/oauth2/token",
                data={"grant_type": "client_credentials", "client_id": "nope", "client_secret": "nope"},
                headers={"accept": "application/json"},
            )
            return token.status_code, token.headers.get("Content-Type", ""), token.json()
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
            seen.append(await reader.readline())
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = LeanHttp()
        try:
            reply = await http.request(
                "GET", f"http://127.0.0.1:{port}/v3/vehicles/a%2Fb/signals", params={"page[size]": "100"}
            )
            assert reply.json() == {}
        finally:
            await http.aclose()
            server.close()
            await server.wait_closed()
        return seen[0]

    line = asyncio.run(scenario())
    assert line.startswith(b"GET /v3/vehicles/a%2Fb/signals?page")
    assert b"=100 HTTP/1.1" in line


def test_a_closed_port_is_a_transport_error():
    async def scenario() -> None:
        http = LeanHttp()
        try:
            await http.request("GET", f"http://127.0.0.1:{free_port()}/v3/vehicles/x")
        finally:
            await http.aclose()

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(scenario())


def test_a_server_that_never_answers_is_a_timeout():
    async def scenario() -> None:
        done = asyncio.Event()
        handlers: list[asyncio.Task[None]] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read(1 << 16)
                await done.wait()
            finally:
                writer.close()
                await writer.wait_closed()

        async def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(silent(reader, writer))
            handlers.append(task)
            await task

        server = await asyncio.start_server(track, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = LeanHttp(timeout_seconds=0.3)
        try:
            await http.request("GET", f"http://127.0.0.1:{port}/")
        finally:
            await http.aclose()
            done.set()
            await asyncio.gather(*handlers, return_exceptions=True)
            server.close()
            await server.wait_closed()

    with pytest.raises(TimeoutError):
        asyncio.run(scenario())


@pytest.mark.parametrize(("proxy", "trusted"), [(None, False), ("http://proxy.internal:3128", True)])
def test_proxies_come_from_the_environment_as_with_httpx(monkeypatch, proxy, trusted):
    """An HTTPS_PROXY is honoured; without one no request reads the environment."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)

    async def scenario() -> bool:
        http = LeanHttp()
        try:
            with contextlib.suppress(aiohttp.ClientError):  # the session opens on the first request
                await http.request("GET", f"http://127.0.0.1:{free_port()}/")
            assert http._session is not None
            return http._session.trust_env
        finally:
            await http.aclose()

    assert asyncio.run(scenario()) is trusted
