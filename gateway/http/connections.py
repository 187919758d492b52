"""uvicorn's HTTP protocol with the limits it lacks. A request's headers must arrive within the
read timeout of its first byte (or of the connection opening), and a body still coming after
the request was answered (refused early: 401, 403, 413) must finish within it too; otherwise
the connection is closed. Without this a client holds a connection for ever by sending nothing
or a byte at a time, and with uvicorn's connection limit (`limit_concurrency`) a few hundred
such clients would shut everyone else out. Headers are also capped in size, which the httptools
parser does not do (uvicorn's `h11_max_incomplete_event_size` is for h11 only).

Once the headers are in, the ASGI app runs and the body has its own deadline, answered with a
408 (gateway/http/middleware.py BodyDeadlineMiddleware)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024  # nginx allows 32 KiB by default; no API client comes close


class _DeadlineProtocol(HttpToolsProtocol):
    """Hooks uvicorn's parser callbacks; `cycle` is the request being answered."""

    read_timeout: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_message = False  # between the first byte of a request and the end of its body
        self._header_bytes: int | None = None  # counted while its headers are incomplete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a new connection must send a request

    def data_received(self, data: bytes) -> None:
        if self._in_message and self.cycle is not None and self.cycle.response_complete:
            self._arm()  # answered already: the rest of the body must come in time too
        super().data_received(data)
        if self._header_bytes is not None:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._header_bytes = None
                self.send_400_response(f"Request headers over {MAX_HEADER_BYTES} bytes.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        self._header_bytes = 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._header_bytes = None
        self._disarm()  # the app has the request now; its body has its own deadline
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.read_timeout and self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def http_protocol(read_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a header deadline of `read_timeout` seconds (0: none)."""
    return type("HttpToolsProtocol", (_DeadlineProtocol,), {"read_timeout": read_timeout})
