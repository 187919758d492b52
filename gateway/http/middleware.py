"""ASGI middleware: a record of each request (its id, timing and outcome), the Host and Origin
gate against web pages, API-key authentication with a per-key concurrency limit, the request
body size cap and its arrival deadline. Plain ASGI rather than BaseHTTPMiddleware, which would
buffer and slow streams."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    ConcurrencyLimit,
    HostNotAllowed,
    OriginNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
)
from gateway.http.errorshape import error_response
from gateway.http.origins import HostPolicy
from gateway.observe.requestlog import GENERATION_ENDPOINTS, RequestRecord, new_request_id
from gateway.service.keys import ApiKeys
from gateway.units import format_bytes

log = logging.getLogger("mlx_manager")

# Answered without a key: they carry no data. Apps probe /api/version (with / and HEAD /, the
# console's open page) to find an Ollama server before they ask for its key.
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/api/version"})


# A request id a client may choose itself (to find its request in the logs).
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RecordMiddleware:
    """Outermost: gives each HTTP request a RequestRecord in its scope (the id, sent back as
    `x-request-id`; a sane id the client sent is kept), notes its status and when its last byte
    went out, and hands the finished record to `finish` (log line, request log, metrics)."""

    def __init__(self, app: ASGIApp, finish: Callable[[RequestRecord], None]) -> None:
        self.app = app
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        asked = Headers(scope=scope).get("x-request-id", "")
        record = RequestRecord(
            scope["path"],
            method=scope["method"],
            request_id=asked if CLIENT_REQUEST_ID.fullmatch(asked) else new_request_id(),
        )
        state = scope.setdefault("state", {})
        state["record"] = record
        status: int | None = None
        complete = False

        async def send_recorded(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = record.request_id
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except Exception as e:  # Starlette answers 500 outside this middleware
            if not complete and record.status is None:
                record.failed(500, f"Internal error: {type(e).__name__}: {e}")
            raise
        finally:
            record.key_name = state.get("api_key")
            record.end(status, complete)
            try:
                self.finish(record)
            except Exception:  # the answer is sent: a failure to record it must not show
                log.exception("could not record request %s", record.request_id)


async def _reject(exc: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    record = scope.get("state", {}).get("record")
    if record is not None:
        record.error = exc.message
    request_id = record.request_id if record is not None else None
    await error_response(scope["path"], exc, request_id)(scope, receive, send)


class OriginMiddleware:
    """Refuse, on every route, a Host that is not a name of this server (DNS rebinding) and an
    Origin that is neither this server nor an allowed web app (a cross-site request), before
    the key is checked: a foreign page learns nothing, not even whether a key is needed.
    Clients that are not browsers send no Origin."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.policy.host_allowed(host):
            exc = HostNotAllowed(
                f"Host {host!r} is not a name of this server, so the request is refused: it is "
                "how a web page reaches a local server by DNS rebinding. To reach the server by "
                "this name, add it to MLX_MANAGER_ALLOWED_HOSTS."
            )
            await _reject(exc, scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and not self.policy.origin_allowed(origin):
            refused: ServiceError = OriginNotAllowed(
                f"Requests from web pages at {origin} are refused: that origin is neither this "
                "server nor one it allows. To let a web app there call this server, add its "
                "origin to MLX_MANAGER_ALLOWED_ORIGINS."
            )
            await _reject(refused, scope, receive, send)
            return
        await self.app(scope, receive, send)


# RFC 7235 credentials: a scheme, then one or more spaces or tabs, then the token.
CREDENTIALS = re.compile(r"([^ \t]+)[ \t]+(.*)", re.DOTALL)


def presented_key(headers: Headers) -> str | None:
    """`Authorization: Bearer KEY` (OpenAI's way) or `x-api-key: KEY` (Anthropic's); both
    trimmed of spaces and tabs, as a pasted key often brings some."""
    found = CREDENTIALS.fullmatch(headers.get("authorization", "").strip(" \t"))
    if found and found[1].lower() == "bearer" and found[2].strip(" \t"):
        return found[2].strip(" \t")
    return headers.get("x-api-key", "").strip(" \t") or None


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        limit: int,
        open_paths: frozenset[str] = OPEN_PATHS,
        open_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.keys = keys
        # Paths answered without a key; they must carry no data (a health check, the schema,
        # the console's page shells and static files).
        self.open_paths = open_paths
        self.open_prefixes = open_prefixes
        self.limit = limit  # requests in flight per key (MLX_MANAGER_MAX_CONCURRENT_PER_KEY)
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]) or not self.keys.required():
            await self.app(scope, receive, send)
            return
        key = presented_key(Headers(scope=scope))
        if key is None:
            exc = Unauthorized(
                "Missing API key: send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY'). "
                "Keys are made with `mlx-manager keys create --name NAME`."
            )
            await _reject(exc, scope, receive, send)
            return
        name = self.keys.check(key)
        if name is None:
            await _reject(Unauthorized("Invalid API key."), scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = name
        if self.keys.touch(name):
            asyncio.get_running_loop().run_in_executor(None, self._touch, name)
        # Requests that occupy a model; the per-key concurrency limit counts these.
        if scope["path"] not in GENERATION_ENDPOINTS or not self.limit:
            await self.app(scope, receive, send)
            return
        if self.in_flight[name] >= self.limit:
            limited: ServiceError = ConcurrencyLimit(
                f"API key '{name}' already has {self.in_flight[name]} requests in flight, the "
                f"most this server allows per key (MLX_MANAGER_MAX_CONCURRENT_PER_KEY)."
            )
            await _reject(limited, scope, receive, send)
            return
        self.in_flight[name] += 1
        try:
            await self.app(scope, receive, send)  # returns when the response (stream) ends
        finally:
            self.in_flight[name] -= 1

    def _open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    def _touch(self, name: str) -> None:
        try:
            self.keys.store.touch_api_key(name)
        except Exception:  # a busy database must not fail the request that used the key
            log.warning("could not record the use of key %r", name, exc_info=True)


class BodyLimitMiddleware:
    """Refuse request bodies above the limit: at once when Content-Length says so, otherwise
    as soon as the bytes received pass it (chunked uploads, a lying header)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _reject(self._error(int(length)), scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(received, more=True)
            return message

        await self.app(scope, limited, send)

    def _error(self, size: int, more: bool = False) -> PayloadTooLarge:
        over = "more than " if more else ""
        return PayloadTooLarge(
            f"The request body is {over}{format_bytes(size)}; this server accepts at most "
            f"{format_bytes(self.max_bytes)} (MLX_MANAGER_MAX_BODY_BYTES)."
        )


class BodyDeadlineMiddleware:
    """A request's body must arrive within `seconds` of its headers, or it gets 408 and the
    connection closes: a client that announces a body and then trickles it, or stops, would
    otherwise hold its connection and a handler for ever. (The headers' own deadline is in
    gateway/http/connections.py; uvicorn has neither.)"""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.seconds:
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        arrived = False

        async def in_time() -> Message:
            nonlocal arrived
            if arrived:  # later calls wait for a disconnect, as long as a stream runs
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body did not arrive within {self.seconds:g} s of its headers "
                    "(MLX_MANAGER_REQUEST_READ_TIMEOUT)."
                ) from None
            arrived = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, in_time, send)
