"""Builds the Starlette app: routes, error handlers and the lifespan that owns the pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import Settings, load_settings
from config.store import Store
from gateway import openai_api
from gateway.catalog import Catalog
from gateway.errors import ServiceError
from gateway.openai_api import parse_body
from gateway.pool import ModelPool
from gateway.schemas import LoadBody, UnloadBody

log = logging.getLogger("mlx_manager")


async def health(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    return JSONResponse(
        {"status": "ok", "loaded": sum(s["state"] == "ready" for s in pool.status())}
    )


async def workers(request: Request) -> Response:
    """Loaded workers with their state: the HTTP face of the pool's status."""
    pool: ModelPool = request.app.state.pool
    return JSONResponse(
        {
            "data": pool.status(),
            "memory_budget_bytes": pool.budget,
            "memory_used_bytes": pool.memory_used(),
            "spare": pool.spare_status(),
        }
    )


async def load_model(request: Request) -> Response:
    body = await parse_body(request, LoadBody)
    return JSONResponse(await request.app.state.pool.load(body.model))


async def unload_model(request: Request) -> Response:
    body = await parse_body(request, UnloadBody)
    return JSONResponse(await request.app.state.pool.unload(body.model, force=body.force))


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    message = (
        f"Unknown path {request.method} {request.url.path}."
        if exc.status_code == 404
        else f"{exc.detail} ({request.method} {request.url.path})."
    )
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


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.home.mkdir(parents=True, exist_ok=True)
        store = Store(settings.db_path)
        pool = ModelPool(settings, Catalog(settings, store))
        app.state.settings, app.state.store, app.state.pool = settings, store, pool
        pool.start()
        # Pinned models (MLX_MANAGER_PRELOAD and pinned profiles) load in the background:
        # the server answers at once, and requests for them wait for their load.
        pinned = [*settings.preload, *(p["name"] for p in store.profiles() if p["pinned"])]
        preload = asyncio.create_task(pool.preload(pinned))
        try:
            yield
        finally:
            preload.cancel()
            await pool.close()

    routes = [
        Route("/health", health),
        Route("/v1/models", openai_api.list_models),
        Route("/v1/models/{model_id:path}", openai_api.get_model),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/admin/workers", workers),
        Route("/admin/load", load_model, methods=["POST"]),
        Route("/admin/unload", unload_model, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
