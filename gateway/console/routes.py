"""The console's routes. Pages are shells without data (a browser navigation cannot send a key);
each page's data comes from fragment routes under /console, which call the service's
operations and render HTML, behind the same key check as every other route. Failures of an
operation are rendered as a message in the page (200): a 4xx answer would show as a network
error in the browser's console, and the message is what a person needs to read."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Scope

from gateway.console.filters import FILTERS, size
from gateway.console.forms import PROFILE_FIELDS, profile_changes
from gateway.errors import InvalidRequest, ServiceError
from gateway.service.service import Service

HERE = Path(__file__).parent
STATIC = HERE / "static"

# Every console response: no inline script or style, nothing from another origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _asset_version() -> str:
    """A digest of the static files: their URLs change when they do, so they can be cached."""
    h = hashlib.sha256()
    for f in sorted(STATIC.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:10]


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(FILTERS)
templates.env.globals["asset_version"] = _asset_version()

PAGES = {
    "/": ("dashboard", "Dashboard"),
    "/models": ("models", "Models"),
    "/profiles": ("profiles", "Profiles"),
    "/chat": ("chat", "Chat"),
    "/logs": ("logs", "Logs"),
    "/keys": ("keys", "Keys"),
}
# What a browser loads without a key: the shells above and the static assets. No data.
OPEN_PATHS = frozenset(PAGES)
OPEN_PREFIXES = ("/static/",)


class CachedStatic(StaticFiles):
    """Static files with a cache lifetime (their URLs carry the assets' version)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if response.status_code in (200, 304):
            response.headers["Cache-Control"] = "public, max-age=604800"
            response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _render(request: Request, template: str, /, **context: Any) -> Response:
    return templates.TemplateResponse(request, template, context, headers=HEADERS)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def page(request: Request) -> Response:
    name, title = PAGES[request.url.path]
    return _render(request, f"{name}.html", page=name, title=title, pages=PAGES)


def _notice(
    request: Request, message: str, error: bool = False, trigger: str | None = None
) -> Response:
    """A message for the page's notice area; `trigger`: an event that refreshes a list."""
    response = _render(request, "frag/notice.html", message=message, error=error)
    if trigger:
        response.headers["HX-Trigger"] = trigger
    return response


Handler = Callable[[Request], Awaitable[Response]]


def action(handler: Handler) -> Handler:
    """A change made from the console: only from its own scripts (htmx sends HX-Request; a
    form another site posts cannot, and a header forces a CORS preflight), and a refusal is
    shown as a message."""

    async def run(request: Request) -> Response:
        if request.headers.get("hx-request") != "true":
            raise InvalidRequest("Console actions are sent by the console's own pages.")
        try:
            return await handler(request)
        except ServiceError as e:
            return _notice(request, e.message, error=True)

    return run


async def _form(request: Request) -> FormData:
    return await request.form()


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


# Session ------------------------------------------------------------------------------------


async def auth(request: Request) -> Response:
    """204 when the key (or no key, when none is required) is accepted: the gate asks here."""
    return Response(status_code=204, headers=HEADERS)


# Dashboard and models -------------------------------------------------------------------------


async def dashboard(request: Request) -> Response:
    service = _service(request)
    status = await service.workers()
    downloads = await service.download_status()
    return _render(
        request,
        "frag/dashboard.html",
        status=status,
        workers=status["data"],
        downloads=[d for d in downloads if d["status"] in ("queued", "running")],
    )


async def models(request: Request) -> Response:
    service = _service(request)
    memory = await service.memory()
    rows = await service.list_models()
    states = {w["model"]: w["state"] for w in await service.list_loaded()}
    for row in rows:
        estimate = row["size_bytes"] * memory["estimate_factor"]
        row["fits"] = estimate <= memory["budget_bytes"]
        row["state"] = states.get(row["id"], "unloaded")
    return _render(request, "frag/models.html", models=rows)


async def model_info(request: Request) -> Response:
    name = request.query_params.get("model", "")
    try:
        info = await _service(request).model_info(name)
    except ServiceError as e:
        return _notice(request, e.message, error=True)
    return _render(request, "frag/model_info.html", name=name, info=info)


@action
async def load(request: Request) -> Response:
    name = _field(await _form(request), "model")
    await _service(request).load(name)
    return _notice(request, f"Loaded {name}.")


@action
async def unload(request: Request) -> Response:
    name = _field(await _form(request), "model")
    await _service(request).unload(name)
    return _notice(request, f"Unloaded {name}.")


@action
async def delete_model(request: Request) -> Response:
    name = _field(await _form(request), "model")
    result = await _service(request).delete_model(name)
    freed = size(result["freed_bytes"])
    return _notice(request, f"Deleted {name} ({freed} freed).")


# Hub and downloads ----------------------------------------------------------------------------


async def hub_search(request: Request) -> Response:
    query = request.query_params.get("q", "").strip()
    try:
        results = await _service(request).search_models(query or None)
    except ServiceError as e:
        return _render(request, "frag/hub.html", results=None, error=e.message, query=query)
    return _render(request, "frag/hub.html", results=results, error=None, query=query)


async def downloads(request: Request) -> Response:
    jobs = await _service(request).download_status()
    return _render(request, "frag/downloads.html", jobs=list(reversed(jobs)))


@action
async def start_download(request: Request) -> Response:
    name = _field(await _form(request), "model")
    await _service(request).download_model(name, wait=False)
    return _notice(request, f"Downloading {name}.", trigger="downloads-changed")


@action
async def cancel_download(request: Request) -> Response:
    job = await _service(request).cancel_download(request.path_params["id"])
    return _notice(request, f"Cancelled the download of {job['model']}.")


# Profiles -------------------------------------------------------------------------------------


async def profiles(request: Request) -> Response:
    rows = await _service(request).list_profiles()
    return _render(request, "frag/profiles.html", profiles=rows)


async def _model_ids(service: Service) -> list[str]:
    return [m["id"] for m in await service.list_models()]


async def profile_form(request: Request) -> Response:
    service = _service(request)
    name = request.query_params.get("name")
    values = await service.get_profile(name) if name else {}
    return _render(
        request,
        "frag/profile_form.html",
        original=name,
        values=values,
        errors={},
        fields=PROFILE_FIELDS,
        models=await _model_ids(service),
    )


@action
async def save_profile(request: Request) -> Response:
    service = _service(request)
    form = await _form(request)
    original = _field(form, "original") or None
    changes, clear, problems = profile_changes(form)
    try:
        if problems:
            raise InvalidRequest(next(iter(problems.values())), param=next(iter(problems)))
        if original is None:
            saved = await service.create_profile(changes)
        else:
            saved = await service.update_profile(original, changes, clear)
    except ServiceError as e:
        field = (e.param or "").split(".")[0] or "form"
        shown = dict(form.items())
        return _render(
            request,
            "frag/profile_form.html",
            original=original,
            values=shown,
            errors={field: e.message},
            fields=PROFILE_FIELDS,
            models=await _model_ids(service),
        )
    return _notice(request, f"Saved profile {saved['name']}.", trigger="profiles-changed")


@action
async def delete_profile(request: Request) -> Response:
    name = request.path_params["name"]
    await _service(request).delete_profile(name)
    return _notice(request, f"Deleted profile {name}.", trigger="profiles-changed")


# Chat -----------------------------------------------------------------------------------------


async def chat_models(request: Request) -> Response:
    names = await _service(request).names()
    return _render(request, "frag/chat_models.html", names=names)


# Logs -----------------------------------------------------------------------------------------


def _int(value: str | None, name: str) -> int | None:
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}.") from None


async def requests_log(request: Request) -> Response:
    q = request.query_params
    try:
        rows = await _service(request).requests_log(
            model=q.get("model") or None,
            key=q.get("key") or None,
            status=_int(q.get("status"), "Status"),
            errors_only=q.get("errors") == "on",
            since=q.get("since") or None,
            limit=100,
        )
    except ServiceError as e:
        return _notice(request, e.message, error=True)
    return _render(request, "frag/requests.html", rows=rows)


async def usage(request: Request) -> Response:
    service = _service(request)
    since = request.query_params.get("since") or "24h"
    try:
        by_model = await service.usage_stats(since, "model")
        by_key = await service.usage_stats(since, "key")
    except ServiceError as e:
        return _notice(request, e.message, error=True)
    return _render(request, "frag/usage.html", by_model=by_model, by_key=by_key)


async def worker_log(request: Request) -> Response:
    name = request.query_params.get("model", "")
    if not name:
        return _notice(request, "Choose a model to see its worker log.")
    try:
        log = await _service(request).worker_logs(name, 200)
    except ServiceError as e:
        return _notice(request, e.message, error=True)
    return _render(request, "frag/worker_log.html", log=log, name=name)


# Keys -----------------------------------------------------------------------------------------


async def keys(request: Request) -> Response:
    return _render(request, "frag/keys.html", keys=await _service(request).list_keys())


@action
async def create_key(request: Request) -> Response:
    created = await _service(request).create_key(_field(await _form(request), "name"))
    response = _render(request, "frag/key_created.html", key=created)
    # After the swap: the console keeps the first key made as its own (app.js) before the
    # list is fetched again, which from now on needs a key.
    response.headers["HX-Trigger-After-Settle"] = "keys-changed"
    return response


@action
async def revoke_key(request: Request) -> Response:
    name = request.path_params["name"]
    await _service(request).revoke_key(name)
    return _notice(request, f"Revoked key {name}.", trigger="keys-changed")


ROUTES: list[BaseRoute] = [
    *(Route(path, page) for path in PAGES),
    Mount("/static", app=CachedStatic(directory=STATIC), name="static"),
    Route("/console/auth", auth),
    Route("/console/dashboard", dashboard),
    Route("/console/models", models),
    Route("/console/models/info", model_info),
    Route("/console/models/load", load, methods=["POST"]),
    Route("/console/models/unload", unload, methods=["POST"]),
    Route("/console/models/delete", delete_model, methods=["POST"]),
    Route("/console/hub", hub_search),
    Route("/console/downloads", downloads),
    Route("/console/downloads", start_download, methods=["POST"]),
    Route("/console/downloads/{id}/cancel", cancel_download, methods=["POST"]),
    Route("/console/profiles", profiles),
    Route("/console/profiles/form", profile_form),
    Route("/console/profiles", save_profile, methods=["POST"]),
    Route("/console/profiles/{name:path}/delete", delete_profile, methods=["POST"]),
    Route("/console/chat/models", chat_models),
    Route("/console/logs/requests", requests_log),
    Route("/console/logs/usage", usage),
    Route("/console/logs/worker", worker_log),
    Route("/console/keys", keys),
    Route("/console/keys", create_key, methods=["POST"]),
    Route("/console/keys/{name}/revoke", revoke_key, methods=["POST"]),
]
