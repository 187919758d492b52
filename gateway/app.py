"""Builds the Starlette app: routes, error handlers and the lifespan that owns the pool."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import Settings, load_settings
from gateway import openai_api
from gateway.errors import InvalidRequest, ServiceError
from gateway.keys import write_token_file
from gateway.metrics import CONTENT_TYPE
from gateway.middleware import (
    AuthMiddleware,
    BodyDeadlineMiddleware,
    BodyLimitMiddleware,
    OriginMiddleware,
    RecordMiddleware,
)
from gateway.openai_api import json_object, parse_body
from gateway.openapi import openapi_document
from gateway.origins import host_policy
from gateway.schemas import LoadBody, UnloadBody
from gateway.service import Service
from mcp_tools.server import build_mcp

log = logging.getLogger("mlx_manager")


async def health(request: Request) -> Response:
    service: Service = request.app.state.service
    loaded = sum(s["state"] == "ready" for s in await service.list_loaded())
    return JSONResponse({"status": "ok", "service": "mlx-manager", "loaded": loaded})


async def workers(request: Request) -> Response:
    """Models with their worker state, and the memory budget: the pool's status over HTTP."""
    return JSONResponse(await request.app.state.service.workers())


async def load_model(request: Request) -> Response:
    body = await parse_body(request, LoadBody)
    return JSONResponse(await request.app.state.service.load(body.model))


async def unload_model(request: Request) -> Response:
    body = await parse_body(request, UnloadBody)
    return JSONResponse(await request.app.state.service.unload(body.model, force=body.force))


async def start_download(request: Request) -> Response:
    body = await parse_body(request, LoadBody)
    service: Service = request.app.state.service
    return JSONResponse(await service.download_model(body.model, wait=False), status_code=202)


async def downloads(request: Request) -> Response:
    return JSONResponse({"data": await request.app.state.service.download_status()})


async def download(request: Request) -> Response:
    service: Service = request.app.state.service
    if request.method == "DELETE":
        return JSONResponse(await service.cancel_download(request.path_params["id"]))
    return JSONResponse(await service.download_status(request.path_params["id"]))


async def profiles(request: Request) -> Response:
    service: Service = request.app.state.service
    if request.method == "POST":
        return JSONResponse(await service.create_profile(await json_object(request)), 201)
    return JSONResponse({"data": await service.list_profiles()})


async def profile(request: Request) -> Response:
    service: Service = request.app.state.service
    name = request.path_params["name"]
    if request.method == "PATCH":
        changes = await json_object(request)
        clear = changes.pop("clear", None) or []
        return JSONResponse(await service.update_profile(name, changes, clear))
    if request.method == "DELETE":
        return JSONResponse(await service.delete_profile(name))
    return JSONResponse(await service.get_profile(name))


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def metrics(request: Request) -> Response:
    service: Service = request.app.state.service
    return Response(await service.metrics(), media_type=CONTENT_TYPE)


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}.", param=name) from None


async def requests_log(request: Request) -> Response:
    """GET /admin/requests?model=&key=&status=&errors=1&since=1h&limit=50&after_id="""
    q = request.query_params
    rows = await request.app.state.service.requests_log(
        model=q.get("model") or None,
        key=q.get("key") or None,
        status=_int(request, "status"),
        errors_only=q.get("errors", "").lower() in ("1", "true", "yes"),
        since=q.get("since") or None,
        limit=_int(request, "limit", 50) or 50,
        after_id=_int(request, "after_id"),
        endpoint=q.get("endpoint") or None,
    )
    return JSONResponse({"data": rows})


async def usage(request: Request) -> Response:
    """GET /admin/usage?since=24h&by=model|key|model,key|total"""
    q = request.query_params
    stats = await request.app.state.service.usage_stats(
        q.get("since") or "24h", q.get("by") or "model"
    )
    return JSONResponse(stats)


async def worker_logs(request: Request) -> Response:
    """GET /admin/logs/{model}?lines=100: a model's worker log."""
    service: Service = request.app.state.service
    lines = _int(request, "lines", 100) or 100
    return JSONResponse(await service.worker_logs(request.path_params["model"], lines))


def _note_error(request: Request, message: str) -> None:
    record = getattr(request.state, "record", None)
    if record is not None:
        record.error = message


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    _note_error(request, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    message = (
        f"Unknown path {request.method} {request.url.path}."
        if exc.status_code == 404
        else f"{exc.detail} ({request.method} {request.url.path})."
    )
    _note_error(request, message)
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = {
        "error": {
            "message": f"Internal error: {type(exc).__name__}. See the server log.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=500)


def create_app(settings: Settings | None = None, service: Service | None = None) -> Starlette:
    settings = settings or load_settings()
    service = service or Service(settings)
    policy = host_policy(settings)
    mcp = build_mcp(service)
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
            async with mcp.session_manager.run():
                yield
        finally:
            await service.close()
            settings.token_file().unlink(missing_ok=True)

    routes = [
        Route("/health", health),
        Route("/openapi.json", openapi),
        Route("/metrics", metrics),
        Route("/v1/models", openai_api.list_models),
        Route("/v1/models/{model_id:path}", openai_api.get_model),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/admin/workers", workers),
        Route("/admin/load", load_model, methods=["POST"]),
        Route("/admin/unload", unload_model, methods=["POST"]),
        Route("/admin/downloads", downloads),
        Route("/admin/downloads", start_download, methods=["POST"]),
        Route("/admin/downloads/{id}", download, methods=["GET", "DELETE"]),
        Route("/admin/profiles", profiles, methods=["GET", "POST"]),
        Route("/admin/profiles/{name:path}", profile, methods=["GET", "PATCH", "DELETE"]),
        Route("/admin/requests", requests_log),
        Route("/admin/usage", usage),
        Route("/admin/logs/{model:path}", worker_logs),
        # /mcp, taken from the SDK's app rather than mounted at "/", so that every other path
        # still gets this app's own OpenAI-shaped 404.
        *mcp_app.routes,
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
        Middleware(AuthMiddleware, keys=service.keys, limit=settings.max_concurrent_per_key),
        Middleware(BodyLimitMiddleware, max_bytes=settings.body_limit_bytes),
        Middleware(BodyDeadlineMiddleware, seconds=settings.request_read_timeout),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
