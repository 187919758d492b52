"""The /admin routes (and /health, /metrics, /openapi.json): the service's management
operations over HTTP, each a thin translation."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import InvalidRequest
from gateway.http.handler import json_object, parse_body
from gateway.http.openapi import openapi_document
from gateway.http.schemas import LoadBody, UnloadBody
from gateway.observe.metrics import CONTENT_TYPE
from gateway.service.service import Service


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


ROUTES = [
    Route("/health", health),
    Route("/openapi.json", openapi),
    Route("/metrics", metrics),
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
]
