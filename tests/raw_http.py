"""HTTP/1.1 over a plain socket, for what real clients will not send: slow or partial requests,
headers with odd whitespace, connections held open on purpose."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

# A guard against a hung test, not a measured time: a healthy answer comes in well under it.
WAIT_SECONDS = 60.0


@dataclass
class Reply:
    status: int  # 0: the server closed the connection without answering
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS)
    sock.settimeout(WAIT_SECONDS)
    return sock


def request_bytes(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    """A request, with `Host` and (for a body) `Content-Length` added unless given."""
    lines = [f"{method} {path} HTTP/1.1"]
    given = {k.lower() for k in headers}
    if "host" not in given:
        lines.append(f"Host: 127.0.0.1:{port}")
    if body and "content-length" not in given:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_reply(sock: socket.socket) -> Reply:
    """One response (by its Content-Length), or status 0 when the connection closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return Reply(0, {}, data)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Reply(int(status_line.split()[1]), headers, body)


def wait_closed(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (a socket timeout if it never does); returns
    what it sent meanwhile."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def exchange(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> Reply:
    with connect(port) as sock:
        sock.sendall(request_bytes(port, method, path, headers, body))
        return read_reply(sock)
