"""What every HTTP face's handlers share: the request's JSON body, parsed strictly and
validated (a 400 naming the field; 415 for a body not sent as JSON), the service and the
request's record, and watching for the client leaving while a request waits or generates."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.errors import InvalidRequest, ServiceError, UnsupportedMediaType
from gateway.http import jsonbody
from gateway.observe.requestlog import RequestRecord
from gateway.service.service import Service

B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")
SSE_PING_SECONDS = 15


def service_of(request: Request) -> Service:
    return request.app.state.service


def record_of(request: Request) -> RequestRecord:
    """The request's record (gateway/http/middleware.py), or a detached one outside the app."""
    record = getattr(request.state, "record", None)
    return record if record is not None else RequestRecord(request.url.path)


async def json_object(request: Request) -> dict[str, Any]:
    """Every JSON body of /v1 and /admin is parsed here, strictly (gateway/http/jsonbody.py)."""
    body = await request.body()
    # Only JSON sent as JSON: a web page can send any other type (text/plain, a form, none)
    # without a CORS preflight, so parsing those would let it skip the browser's check.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if body and media_type != "application/json":
        sent = repr(media_type) if media_type else "none"
        raise UnsupportedMediaType(
            "The request body must be JSON, sent with 'Content-Type: application/json' "
            f"(this one's content type: {sent})."
        )
    try:
        data = jsonbody.loads(body)
    except jsonbody.JSONError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


async def parse_body(
    request: Request,
    schema: type[B],
    invalid: Callable[[ValidationError], InvalidRequest] | None = None,
) -> B:
    """The body as `schema`; what fails validation is a 400 worded by `invalid` (a protocol
    may name fields its own way), by default naming the first bad field."""
    data = await json_object(request)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise (invalid or _validation_error)(e) from None


def _validation_error(e: ValidationError) -> InvalidRequest:
    err = e.errors()[0]
    # Union members add their type name to the location; a person wants the field path.
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPES))]
    param = ".".join(loc) or None
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param)


_TYPES = {"str", "int", "float", "bool", "list", "dict", "function-after", "TextPart"}


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` (waiting in a model's queue, generating); if the client leaves first, cancel
    it, which takes the request out of the queue or stops its generation."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        watch.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ServiceError):
        await task
    raise ClientDisconnected


def arguments_object(text: str) -> dict[str, Any]:
    """A tool call's arguments as an object (Anthropic's and Ollama's answers carry them so);
    a call cut off mid-way (max_tokens) has none."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
