"""Builds the Starlette app: the routes of the HTTP faces, middleware, error handlers and the
lifespan that starts and stops the service."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager, nullcontext

from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from config.settings import Settings
from gateway.errors import ServiceError
from gateway.http import admin, embeddings, messages, ollama, rerank, responses, v1
from gateway.http.errorshape import error_response
from gateway.http.handler import ClientDisconnected
from gateway.http.middleware import (
    OPEN_PATHS,
    AuthMiddleware,
    BodyDeadlineMiddleware,
    BodyLimitMiddleware,
    OriginMiddleware,
    RecordMiddleware,
)
from gateway.http.origins import host_policy
from gateway.observe.requestlog import CANCELLED
from gateway.service.keys import write_token_file
from gateway.service.service import Service

log = logging.getLogger("mlx_manager")


def _note_error(request: Request, message: str) -> None:
    record = getattr(request.state, "record", None)
    if record is not None:
        record.error = message


def _request_id(request: Request) -> str | None:
    record = getattr(request.state, "record", None)
    return record.request_id if record is not None else None


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    _note_error(request, exc.message)
    return error_response(request.url.path, exc, _request_id(request))


async def _client_left(request: Request, exc: Exception) -> Response:
    """The client went away before its answer (handler.unless_disconnected cancelled the
    work): nginx's 499, which the request log records; nobody reads the body."""
    return Response(status_code=CANCELLED)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = (
        f"Unknown path {request.method} {request.url.path}."
        if exc.status_code == 404
        else f"{exc.detail} ({request.method} {request.url.path})."
    )
    _note_error(request, message)
    error = ServiceError(message)
    error.status = exc.status_code
    error.type = "not_found" if exc.status_code == 404 else "invalid_request_error"
    response = error_response(request.url.path, error, _request_id(request))
    response.headers.update(exc.headers or {})
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    error = ServiceError(f"Internal error: {type(exc).__name__}. See the server log.")
    return error_response(request.url.path, error, _request_id(request))


def create_app(
    settings: Settings,
    service: Service,
    mcp: MCPServer | None = None,
    pages: Sequence[BaseRoute] = (),
    open_paths: Collection[str] = (),
    open_prefixes: tuple[str, ...] = (),
) -> Starlette:
    """The HTTP face over `service`, with an MCP server's streamable HTTP transport at /mcp
    and the web console's `pages` (the composition root, gateway/cli/serve.py, builds the
    faces over one service). `open_paths` and `open_prefixes` answer without a key: the
    console's page shells and static files, which hold no data."""
    policy = host_policy(settings)
    mcp_app = None
    if mcp is not None:
        mcp_app = mcp.streamable_http_app(
            streamable_http_path="/mcp",
            transport_security=policy.transport_security(),
            host=settings.host,
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings, app.state.service = settings, service
        service.keys.add_local_token(write_token_file(settings))
        await service.start()
        try:
            # Starlette does not run a mounted app's lifespan: MCP's session manager runs here.
            async with mcp.session_manager.run() if mcp is not None else nullcontext():
                yield
        finally:
            await service.close()
            settings.token_file().unlink(missing_ok=True)

    routes = [
        *admin.ROUTES,
        *v1.ROUTES,
        *embeddings.ROUTES,
        *rerank.ROUTES,
        *responses.ROUTES,
        *messages.ROUTES,
        *ollama.ROUTES,
        *pages,
        # /mcp, taken from the SDK's app rather than mounted at "/", so that every other path
        # still gets this app's own OpenAI-shaped 404.
        *(mcp_app.routes if mcp_app is not None else []),
    ]
    middleware = [
        # Outermost first: every request gets an id and a log line, even one refused for its
        # key; then a request without a valid key learns nothing else.
        Middleware(RecordMiddleware, finish=service.finish_request),
        # Then a foreign web page is refused, and an allowed one gets its CORS answers
        # (preflights carry no key).
        Middleware(OriginMiddleware, policy=policy),
        Middleware(
            CORSMiddleware,
            allow_origins=["*"] if policy.any_origin else [],
            allow_origin_regex=None if policy.any_origin else policy.origin_regex(),
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["*"],
            # Chrome asks before a public site may call a server on this machine.
            allow_private_network=True,
            expose_headers=["x-request-id", "retry-after", "mcp-session-id"],
        ),
        Middleware(
            AuthMiddleware,
            keys=service.keys,
            limit=settings.max_concurrent_per_key,
            open_paths=OPEN_PATHS | frozenset(open_paths),
            open_prefixes=open_prefixes,
        ),
        Middleware(BodyLimitMiddleware, max_bytes=settings.body_limit_bytes),
        Middleware(BodyDeadlineMiddleware, seconds=settings.request_read_timeout),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ServiceError: _service_error,
            ClientDisconnected: _client_left,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
