"""Slow and hoarding clients on a real server: a request whose headers or body do not arrive in
time is answered 408 or cut off while other clients are served, and connections beyond the limit
get 503. Raw sockets, as no real client is this slow on purpose."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Models
from tests.raw_http import connect, exchange, read_reply, request_bytes, wait_closed
from tests.server import Server, start_server

HELLO = [{"role": "user", "content": "hello world"}]
READ_TIMEOUT = "2"  # seconds (MLX_MANAGER_REQUEST_READ_TIMEOUT): short, so the test is too


@pytest.fixture(scope="module")
def strict(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("slow") / "home"
    server = start_server(home, models.env(home, request_read_timeout=READ_TIMEOUT))
    yield server
    server.stop()


def _opened(server: Server, data: bytes, count: int) -> list[socket.socket]:
    socks = [connect(server.port) for _ in range(count)]
    for sock in socks:
        if data:
            sock.sendall(data)
    return socks


def test_requests_that_do_not_arrive_in_time_are_cut_off(strict: Server) -> None:
    port = strict.port
    # Headers with a Content-Length, and one byte of the body.
    headers = {"Content-Type": "application/json", "Content-Length": "200"}
    slow_bodies = _opened(strict, request_bytes(port, "POST", "/v1/chat/completions", headers), 20)
    for sock in slow_bodies:
        sock.sendall(b"{")
    # Headers that never end, and connections that never send anything.
    partial = f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: a".encode()
    slow_headers = _opened(strict, partial, 5)
    silent = _opened(strict, b"", 5)
    # A request answered before its body came (refused for its origin), whose body then trickles.
    refused = connect(port)
    refused.sendall(request_bytes(port, "POST", "/admin/load", {**headers, "Origin": "http://x"}))
    assert read_reply(refused).status == 403
    refused.sendall(b"{")

    # Meanwhile other clients are served.
    sdk = openai.OpenAI(base_url=strict.v1, api_key="unused", max_retries=0, timeout=60)
    assert sdk.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2).usage

    for sock in slow_bodies:
        reply = read_reply(sock)
        assert reply.status == 408, reply
        error = reply.json()["error"]
        assert error["code"] == "request_timeout", error
        assert "MLX_MANAGER_REQUEST_READ_TIMEOUT" in error["message"], error
        assert reply.headers["connection"] == "close"
        wait_closed(sock)  # and the server hangs up
    for sock in slow_headers:
        sent = wait_closed(sock)
        assert sent == b"" or sent.startswith(b"HTTP/1.1 408 "), sent
    for sock in [*silent, refused]:
        assert wait_closed(sock) == b""
    for sock in [*slow_bodies, *slow_headers, *silent, refused]:
        sock.close()

    # The cut-off requests are in the request log, and the server still serves.
    def timed_out() -> bool:
        rows = httpx.get(strict.url + "/admin/requests?status=408&limit=100").json()["data"]
        return len(rows) >= len(slow_bodies)

    strict.wait_for(timed_out, what="408s in the request log")
    assert sdk.models.list().data
    assert "Traceback" not in strict.log.read_text()


def test_headers_are_capped_in_size(strict: Server) -> None:
    with connect(strict.port) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{strict.port}\r\n".encode())
        try:  # the server may hang up before it has all of this
            sock.sendall(b"X-Big: " + b"a" * (1024 * 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass
        sent = wait_closed(sock)
        assert sent == b"" or sent.startswith(b"HTTP/1.1 400 "), sent[:200]
    assert httpx.get(strict.url + "/health").status_code == 200


def test_a_body_sent_in_pieces_within_the_limit_is_served(strict: Server) -> None:
    body = b'{"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
    headers = {"Content-Type": "application/json"}
    with connect(strict.port) as sock:
        sock.sendall(request_bytes(strict.port, "POST", "/v1/chat/completions", headers, body)[:-9])
        sock.sendall(body[-9:])
        reply = read_reply(sock)
        assert reply.status == 200, reply
        # The connection stays open for the next request (kept alive), and serves it.
        sock.sendall(request_bytes(strict.port, "GET", "/v1/models", {}))
        assert read_reply(sock).status == 200


def test_connections_beyond_the_limit_get_503(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = start_server(home, models.env(home, max_connections="4"))
    held: list[socket.socket] = []
    try:

        def hold_one() -> bool:
            """A kept-alive connection that was served (one the server has not yet seen the
            health checks' connections close may be refused: then try again)."""
            sock = connect(server.port)
            sock.sendall(request_bytes(server.port, "GET", "/health", {}))
            if read_reply(sock).status == 200:
                held.append(sock)
                return True
            sock.close()
            return False

        for _ in range(4):
            server.wait_for(hold_one, what="a connection under the limit")
        # A fifth connection is refused (and closed).
        refused = exchange(server.port, "GET", "/health", {})
        assert refused.status == 503 and refused.headers["connection"] == "close"
        # Once one closes, a new connection is served again.
        held.pop().close()
        server.wait_for(
            lambda: exchange(server.port, "GET", "/health", {}).status == 200,
            what="a connection once one closed",
        )
    finally:
        for sock in held:
            sock.close()
        server.stop()
