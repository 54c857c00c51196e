"""The public port's limits, attacked over real sockets against a real `smartcar-ingest web` process.

Each test starts the console script as a subprocess (the same uvicorn set-up production runs), then
plays one attack: oversized request heads, a head sent byte by byte, connections that send nothing,
idle keep-alive connections, more connections than the cap. What each proves is in its docstring.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.config import Settings
from service.server import GuardedHttpToolsProtocol, bind_admin_socket
from tests.conftest import TOKEN
from tests.procs import WebProcess, free_port, service_env

pytestmark = pytest.mark.process

HEADER_TIMEOUT = 2.0
# How late a close may come after its deadline on a busy two-core machine.
SLACK = 1.5


@dataclass
class Web:
    process: subprocess.Popen[str]
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS line")


@contextlib.contextmanager
def running_web(redis_url: str, tmp_path: Path, *args: str, **env: str) -> Iterator[Web]:
    """`smartcar-ingest web` on free ports (public and admin), stopped on exit."""
    admin_port = free_port()
    settings = service_env(
        **{
            "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "ADMIN_PORT": str(admin_port),
            "ADMIN_HOST": "127.0.0.1",
            "HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
            "LOG_LEVEL": "ERROR",
        }
        | env
    )
    with WebProcess(settings, *args, cwd=tmp_path) as web:
        yield Web(web.process, web.port, admin_port)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_peer(sock: socket.socket, wait: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``wait`` seconds, or None if it stayed open."""
    received = b""
    sock.settimeout(wait)
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return received
    except TimeoutError:
        return None
    return None


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body, read from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_uvicorn_is_the_minor_the_guarded_protocol_was_written_for():
    """GuardedHttpToolsProtocol overrides uvicorn's private HttpToolsProtocol (its parser callbacks,
    ``pipeline``, ``cycle``, ``parser``, ``headers``, ``url``), which a new minor may change: widen
    the pin in pyproject.toml and this minor only once this file passes against the new one."""
    installed = version("uvicorn")
    assert installed.split(".")[:2] == ["0", "54"], f"uvicorn {installed}: the guarded protocol was written for 0.54"
    extended = {name for name in vars(GuardedHttpToolsProtocol) if not name.startswith("_")}
    assert extended - set(vars(HttpToolsProtocol)) == {"on_chunk_header", "on_chunk_complete"}  # httptools' own


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="this host cannot bind one socket to IPv6 and IPv4")
def test_an_admin_host_of_all_ipv6_addresses_also_takes_ipv4():
    """ADMIN_HOST ``::`` binds both stacks, as a plain socket does on Linux: IPv4 probes still reach it."""
    settings = Settings(smartcar_management_token=TOKEN, admin_host="::", admin_port=free_port())
    with (
        bind_admin_socket(settings, public_port=0) as sock,
        socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5),
    ):
        pass


def test_oversized_request_heads_are_refused_without_holding_memory(redis_url, tmp_path):
    """Ten unfinished requests with 8 MB of headers each are refused (4xx, closed) and RSS grows by under 16 MB."""
    with running_web(redis_url, tmp_path) as web:
        for _ in range(20):  # warm-up: imports and pools, so the baseline includes them
            assert httpx.get(f"{web.url}/healthz").status_code == 200
        before = web.rss_mb()
        line = b"X-Pad: " + b"a" * 8185 + b"\r\n"  # 8 KiB a line, 1,024 lines: 8 MiB of head
        attackers = []
        for _ in range(10):
            sock = connect(web.port)
            sock.sendall(b"POST /webhooks/smartcar HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(ConnectionResetError, BrokenPipeError, TimeoutError):
                for _ in range(1024):
                    sock.sendall(line)
            attackers.append(sock)  # never finished, never closed by us
        time.sleep(0.5)
        grown = web.rss_mb() - before
        answers = [closed_by_peer(sock, 5) for sock in attackers]
        for sock in attackers:
            sock.close()
        assert httpx.get(f"{web.url}/healthz").status_code == 200
    assert all(answer is not None for answer in answers), "a connection with an 8 MB head stayed open"
    for answer in answers:
        assert answer == b"" or 400 <= status_of(answer) < 500, answer[:80]
    assert grown < 16, f"RSS grew by {grown:.1f} MB"


def test_heads_up_to_the_limit_are_served(redis_url, tmp_path):
    """A request whose head is just under MAX_HEADER_BYTES is served; one just over it is refused."""
    with running_web(redis_url, tmp_path, MAX_HEADER_BYTES="8192") as web:
        assert httpx.get(f"{web.url}/healthz", headers={"x-pad": "a" * 7000}).status_code == 200
        sock = connect(web.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")
        answer = closed_by_peer(sock, 5)
        sock.close()
    assert answer is not None
    assert answer == b"" or status_of(answer) in {400, 431}


def seconds_until_slow_head_is_cut(sock: socket.socket, start: bytes) -> float | None:
    """Send ``start``, then one more header byte every 0.2 s; the seconds until the web closed the
    connection (None if it was still open HEADER_TIMEOUT + 6 s later). Closes ``sock``."""
    started = time.monotonic()
    try:
        sock.sendall(start)
        while time.monotonic() - started < HEADER_TIMEOUT + 6:
            sock.sendall(b"a")
            if closed_by_peer(sock, 0.2) is not None:
                return time.monotonic() - started
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - started
    finally:
        sock.close()
    return None


def test_a_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout(redis_url, tmp_path):
    """A slowloris client sending one header byte every 0.2 s is disconnected HEADER_TIMEOUT_SECONDS after connecting."""
    with running_web(redis_url, tmp_path) as web:
        sock = connect(web.port)
        closed_after = seconds_until_slow_head_is_cut(sock, b"POST /webhooks/smartcar HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert httpx.get(f"{web.url}/healthz").status_code == 200
    assert closed_after is not None, "the slow head was never cut off"
    assert HEADER_TIMEOUT - 0.5 <= closed_after <= HEADER_TIMEOUT + SLACK


def test_connections_that_send_nothing_are_closed_at_the_header_timeout(redis_url, tmp_path):
    """800 connections that never send a byte are all closed within HEADER_TIMEOUT_SECONDS (plus slack)."""
    with running_web(redis_url, tmp_path, "--max-connections", "1000") as web:
        selector = selectors.DefaultSelector()
        socks = []
        started = time.monotonic()
        for _ in range(800):
            sock = socket.create_connection(("127.0.0.1", web.port), timeout=5)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        open_ = set(socks)
        while open_ and time.monotonic() - started < HEADER_TIMEOUT + SLACK + 1:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with contextlib.suppress(ConnectionResetError):
                    if sock.recv(1) != b"":
                        continue
                selector.unregister(sock)
                open_.discard(sock)
        elapsed = time.monotonic() - started
        for sock in socks:
            sock.close()
        selector.close()
        assert httpx.get(f"{web.url}/healthz").status_code == 200
    assert not open_, f"{len(open_)} of 800 idle connections still open after {elapsed:.1f} s"
    assert elapsed <= HEADER_TIMEOUT + SLACK + 1


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(redis_url, tmp_path):
    """After a served request, a keep-alive connection left idle is closed at --keep-alive-timeout."""
    with running_web(redis_url, tmp_path, "--keep-alive-timeout", "1") as web:
        sock = connect(web.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        answer = closed_by_peer(sock, 1 + SLACK + 1)
        elapsed = time.monotonic() - started
        sock.close()
    assert answer == b""
    assert 0.5 <= elapsed <= 1 + SLACK


def test_a_second_request_head_on_a_kept_alive_connection_has_the_same_deadline(redis_url, tmp_path):
    """Once a request is served, a slow head on the same connection is cut off too, not only the first."""
    with running_web(redis_url, tmp_path, "--keep-alive-timeout", "30") as web:
        sock = connect(web.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        closed_after = seconds_until_slow_head_is_cut(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert closed_after is not None
    assert closed_after <= HEADER_TIMEOUT + SLACK


def test_connections_beyond_the_cap_are_refused_and_service_resumes(redis_url, tmp_path):
    """With --max-connections 40, a connection past the cap gets 503 or is closed; freed slots serve again."""
    with running_web(redis_url, tmp_path, "--max-connections", "40", HEADER_TIMEOUT_SECONDS="30") as web:
        held = [connect(web.port) for _ in range(40)]
        time.sleep(0.3)
        extra = connect(web.port)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = closed_by_peer(extra, 5)
        extra.close()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                if httpx.get(f"{web.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the web did not serve again after the held connections closed"
            time.sleep(0.1)
    assert answer is not None, "the connection past the cap was served nothing and left open"
    assert answer == b"" or status_of(answer) == 503


def test_limits_hold_in_every_process_of_web_workers_2(redis_url, tmp_path):
    """Under `web --workers 2`, idle connections are still closed at the header timeout and big heads refused."""
    with running_web(redis_url, tmp_path, "--workers", "2") as web:
        socks = [connect(web.port) for _ in range(20)]  # spread over both processes by the kernel
        started = time.monotonic()
        answers = [closed_by_peer(sock, HEADER_TIMEOUT + SLACK + 1 - (time.monotonic() - started)) for sock in socks]
        for sock in socks:
            sock.close()
        big = connect(web.port)
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n")
        refused = closed_by_peer(big, 5)
        big.close()
    assert all(answer == b"" for answer in answers), answers
    assert refused is not None
    assert refused == b"" or status_of(refused) in {400, 431}


def read_statuses(sock: socket.socket, count: int) -> list[int]:
    """The statuses of ``count`` responses read in order from ``sock`` (Content-Length or chunked bodies)."""
    data, statuses = b"", []
    while len(statuses) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {statuses}"
        data += chunk
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                break
            lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if lengths:
                end = int(lengths[0].split(b":")[1])
                if len(rest) < end:
                    break
            else:  # chunked: the last chunk of a short JSON body
                end = rest.find(b"0\r\n\r\n") + 5
                if end < 5:
                    break
            statuses.append(status_of(head))
            data = rest[end:]
    return statuses


def send_in_pieces(sock: socket.socket, data: bytes, size: int) -> None:
    """Send ``data`` ``size`` bytes at a time, pausing between pieces so that each arrives in a read of its own."""
    for start in range(0, len(data), size):
        sock.sendall(data[start : start + size])
        time.sleep(0.005)


def test_pipelined_requests_on_one_connection_are_all_answered(redis_url, tmp_path):
    """Requests sent back to back on one connection are answered in order, including a head that
    starts in the same read as the previous request's 100 KB body (the body is not counted as head)."""
    with running_web(redis_url, tmp_path, MAX_HEADER_BYTES="8192") as web:
        sock = connect(web.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        pair = read_statuses(sock, 2)
        body = b'{"pad": "' + b"a" * 100_000 + b'"}'
        post = b"POST /webhooks/smartcar HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        get = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 6000 + b"\r\n\r\n"
        sock.sendall(post + get[:4000])
        time.sleep(0.3)
        sock.sendall(get[4000:])
        after_body = read_statuses(sock, 2)
        sock.close()
    assert pair == [200, 200]
    assert after_body == [401, 200]  # unsigned delivery, then the padded head


def test_a_head_split_over_many_reads_is_served_up_to_the_limit(redis_url, tmp_path):
    """A head of just under MAX_HEADER_BYTES sent 100 bytes at a time is served; one that passes the
    limit before it is finished is answered 431 and closed."""
    with running_web(redis_url, tmp_path, MAX_HEADER_BYTES="8192") as web:
        sock = connect(web.port)
        send_in_pieces(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n", 100)
        served = read_statuses(sock, 1)
        sock.close()
        sock = connect(web.port)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            send_in_pieces(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000, 100)
        refused = closed_by_peer(sock, 5)
        sock.close()
    assert served == [200]
    assert refused is not None
    assert status_of(refused) == 431


def growth_under(web: Any, attack: Callable[[Any], list[socket.socket]]) -> tuple[float, list[Any]]:
    """Warm the web up, run ``attack`` (which returns its sockets), and return how much the web's
    RSS grew (MB) and what each attacking socket saw when the web closed it (None: still open)."""
    for _ in range(20):  # imports and pools, so the baseline includes them
        assert httpx.get(f"{web.url}/healthz").status_code == 200
    before = web.rss_mb()
    socks = attack(web)
    time.sleep(0.5)
    grown = web.rss_mb() - before
    answers = [closed_by_peer(sock, 5) for sock in socks]
    for sock in socks:
        sock.close()
    assert httpx.get(f"{web.url}/healthz").status_code == 200
    return grown, answers


def test_a_flood_of_pipelined_requests_is_cut_off_without_holding_memory(redis_url, tmp_path):
    """Twenty connections each sending 250 KB of tiny pipelined requests at once are closed, and RSS
    grows by under 16 MB (each request parsed would otherwise be held in a queue)."""
    flood = b"GET /healthz HTTP/1.1\r\n\r\n" * 10_000

    def attack(web: Any) -> list[socket.socket]:
        socks = [connect(web.port) for _ in range(20)]
        for sock in socks:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(flood)
        return socks

    with running_web(redis_url, tmp_path) as web:
        grown, answers = growth_under(web, attack)
    assert all(answer is not None for answer in answers), "a flooding connection stayed open"
    assert grown < 16, f"RSS grew by {grown:.1f} MB"


def test_chunked_trailers_are_bounded_like_a_head(redis_url, tmp_path):
    """Ten chunked requests whose trailers grow to 8 MB are closed, and RSS grows by under 16 MB."""
    line = b"X-Pad: " + b"a" * 8185 + b"\r\n"

    def attack(web: Any) -> list[socket.socket]:
        attackers = []
        for _ in range(10):
            sock = connect(web.port)
            sock.sendall(
                b"POST /webhooks/smartcar HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
            )
            with contextlib.suppress(ConnectionResetError, BrokenPipeError, TimeoutError):
                for _ in range(1024):
                    sock.sendall(line)
            attackers.append(sock)
        return attackers

    with running_web(redis_url, tmp_path) as web:
        grown, answers = growth_under(web, attack)
    assert all(answer is not None for answer in answers), "a connection with 8 MB of trailers stayed open"
    assert grown < 16, f"RSS grew by {grown:.1f} MB"


def test_heads_of_many_short_header_lines_are_refused_without_holding_memory(redis_url, tmp_path):
    """A head of 100 header lines is served and one of 101 is answered 431; 300 unfinished heads of
    3,000 "a:b" lines each (15 KB, under MAX_HEADER_BYTES) are refused, and RSS grows by under 16 MB."""
    lines = [b"x%d:b\r\n" % i for i in range(3000)]
    with running_web(redis_url, tmp_path) as web:
        for _ in range(20):
            assert httpx.get(f"{web.url}/healthz").status_code == 200
        sock = connect(web.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(lines[:99]) + b"\r\n")
        served = read_statuses(sock, 1)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(lines[:100]) + b"\r\n")
        refused = closed_by_peer(sock, 5)
        sock.close()

        def attack(web: Any) -> list[socket.socket]:
            attackers = [connect(web.port) for _ in range(300)]
            for sock in attackers:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b"POST /webhooks/smartcar HTTP/1.1\r\nHost: x\r\n" + b"".join(lines))
            return attackers

        grown, answers = growth_under(web, attack)
    assert served == [200]
    assert refused is not None
    assert status_of(refused) == 431
    assert all(answer is not None for answer in answers), "a connection with 3,000 header lines stayed open"
    assert grown < 16, f"RSS grew by {grown:.1f} MB"
