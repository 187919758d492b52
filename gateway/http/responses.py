"""The OpenAI Responses face: `POST /v1/responses` (an answer as a response object, or a stream
of its semantic events), `GET` and `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/
input_items` and `POST /v1/responses/input_tokens`. Bodies are validated and translated in
responses_schema.py; generation, token counting and stored responses are the service's.

One renderer (`_Output`) turns the service's events into output items and the stream events
that announce them; a non-streamed answer runs the same renderer and keeps only the items, so
the two cannot disagree."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.engine.protocol import Finished, Output, Reasoning, Text, ToolCallArgs, ToolCallStart
from gateway.errors import InvalidRequest, ServiceError
from gateway.http.handler import (
    SSE_PING_SECONDS,
    parse_body,
    record_of,
    service_of,
    unless_disconnected,
)
from gateway.http.responses_schema import InputTokensRequest, ResponseCreate, new_id
from gateway.observe.usage import Usage
from gateway.service.backend import Stream
from gateway.service.service import Service

Event = tuple[str, dict[str, Any]]  # a stream event's type and fields (no sequence number)


class _Output:
    """A response's output items, built from the service's events one at a time. Each step
    returns the stream events that say what changed: an item opens (`output_item.added`, and
    its content part), grows (text, reasoning or argument deltas) and closes (`.done` events)
    when another begins or the answer ends."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.reason: str | None = None  # stop | length | tool_calls, once finished
        self._open: dict[str, Any] | None = None
        self._parts: list[str] = []  # the open item's text or arguments so far

    def feed(self, ev: Output) -> list[Event]:
        if isinstance(ev, Text):
            events = self._ensure("message")
            return [*events, ("response.output_text.delta", self._delta(ev.text, logprobs=[]))]
        if isinstance(ev, Reasoning):
            events = self._ensure("reasoning")
            return [*events, ("response.reasoning_text.delta", self._delta(ev.text))]
        if isinstance(ev, ToolCallStart):
            call = {"call_id": ev.call_id, "name": ev.name, "arguments": ""}
            return [*self._close("completed"), *self._start("function_call", call)]
        if isinstance(ev, ToolCallArgs):
            self._parts.append(ev.text)
            fields = {"item_id": self._item_id, "output_index": self._index, "delta": ev.text}
            return [("response.function_call_arguments.delta", fields)]
        assert isinstance(ev, Finished)
        self.reason = ev.reason
        events = self._close("incomplete" if ev.reason == "length" else "completed")
        if not self.items:  # nothing at all was said: an empty message, as OpenAI sends
            events += [*self._start("message"), *self._close("completed")]
        return events

    def cut(self) -> list[dict[str, Any]]:
        """The items so far, the open one incomplete (the answer failed midway)."""
        if self._open is not None:
            self._fill(self._open, "incomplete")
        return self.items

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    @property
    def _item_id(self) -> str:
        assert self._open is not None
        return cast(str, self._open["id"])

    def _delta(self, text: str, **extra: Any) -> dict[str, Any]:
        self._parts.append(text)
        return {
            "item_id": self._item_id,
            "output_index": self._index,
            "content_index": 0,
            "delta": text,
            **extra,
        }

    def _ensure(self, kind: str) -> list[Event]:
        if self._open is not None and self._open["type"] == kind:
            return []
        return [*self._close("completed"), *self._start(kind)]

    def _start(self, kind: str, fields: dict[str, Any] | None = None) -> list[Event]:
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        item: dict[str, Any] = {"id": new_id(prefix), "type": kind, "status": "in_progress"}
        if kind == "message":
            item |= {"role": "assistant", "content": []}
        elif kind == "reasoning":
            item |= {"summary": [], "content": []}
        item |= fields or {}
        self._open, self._parts = item, []
        self.items.append(item)
        added = ("response.output_item.added", {"output_index": self._index, "item": dict(item)})
        part = _part(kind, "")
        if part is None:
            return [added]
        where = {"item_id": item["id"], "output_index": self._index, "content_index": 0}
        return [added, ("response.content_part.added", {**where, "part": part})]

    def _close(self, status: str) -> list[Event]:
        item = self._open
        if item is None:
            return []
        self._fill(item, status)
        self._open = None
        where = {"item_id": item["id"], "output_index": self._index}
        done = ("response.output_item.done", {"output_index": self._index, "item": item})
        if item["type"] == "function_call":
            arguments = ("response.function_call_arguments.done", {**where, **_args(item)})
            return [arguments, done]
        text = "".join(self._parts)
        where["content_index"] = 0
        if item["type"] == "message":
            text_done = ("response.output_text.done", {**where, "text": text, "logprobs": []})
        else:
            text_done = ("response.reasoning_text.done", {**where, "text": text})
        part_done = ("response.content_part.done", {**where, "part": item["content"][0]})
        return [text_done, part_done, done]

    def _fill(self, item: dict[str, Any], status: str) -> None:
        """An item's final form, from what was written into it."""
        text = "".join(self._parts)
        item["status"] = status
        if item["type"] == "function_call":
            item["arguments"] = text
        else:
            item["content"] = [_part(item["type"], text)]


def _part(kind: str, text: str) -> dict[str, Any] | None:
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return None


def _args(item: dict[str, Any]) -> dict[str, Any]:
    return {"name": item["name"], "arguments": item["arguments"]}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # Writes to the prompt cache are not counted apart here (the SDK's types require it).
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def _failure(e: ServiceError) -> dict[str, Any]:
    """A response's `error`: its code one of OpenAI's where one fits (clients such as Codex
    act on `context_length_exceeded` and `rate_limit_exceeded`)."""
    if e.code == "context_length_exceeded":
        code = e.code
    elif e.status == 429:
        code = "rate_limit_exceeded"
    elif 400 <= e.status < 500:
        code = "invalid_prompt"
    else:
        code = "server_error"
    return {"code": code, "message": e.message, "param": e.param, "type": e.type}


class _Response:
    """The response object of one request, at each stage of its life."""

    def __init__(self, body: ResponseCreate) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.model = body.model
        self.echo = body.echo()

    def object(
        self,
        status: str,
        output: list[dict[str, Any]] | None = None,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        output = output or []
        text = "".join(
            part["text"]
            for item in output
            if item["type"] == "message"
            for part in item["content"]
            if part["type"] == "output_text"
        )
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "output_text": text,
            "usage": _usage(usage) if usage is not None else None,
            **self.echo,
        }

    def finished(self, output: _Output, usage: Usage) -> dict[str, Any]:
        status = "incomplete" if output.reason == "length" else "completed"
        return self.object(status, output.items, usage)


def _key(request: Request) -> str | None:
    """The API key's name (gateway/http/middleware.py): a stored response is its key's."""
    return getattr(request.state, "api_key", None)


async def _history(
    service: Service, body: ResponseCreate, key: str | None
) -> tuple[list[Any], str | None]:
    """The items a request continues: its previous response's input (that response's own
    predecessors included) and output; and the model that answered them."""
    if body.previous_response_id is None:
        return [], None
    stored = await service.stored_response(body.previous_response_id, key, "previous_response_id")
    return [*stored.input_items, *stored.response["output"]], stored.response["model"]


async def create(request: Request) -> Response:
    body = await parse_body(request, ResponseCreate)
    service, key = service_of(request), _key(request)
    history, _ = await _history(service, body, key)
    generate = body.generate_request(history)
    items = [*history, *body.items()]  # what this response's prompt was, as it is stored
    response = _Response(body)
    stream = await unless_disconnected(request, service.generate(generate, record_of(request)))
    if body.stream:
        events = _events(service, stream, body, response, items, key)
        return EventSourceResponse(events, ping=SSE_PING_SECONDS, sep="\n")
    output = _Output()
    await unless_disconnected(request, _consume(stream, output))
    finished = response.finished(output, stream.usage)
    if body.store:
        await service.save_response(finished, items, key)
    return JSONResponse(finished)


async def _consume(stream: Stream, output: _Output) -> None:
    async for ev in stream:
        output.feed(ev)


async def _events(
    service: Service,
    stream: Stream,
    body: ResponseCreate,
    response: _Response,
    items: list[dict[str, Any]],
    key: str | None,
) -> AsyncIterator[bytes]:
    numbers = itertools.count()

    def event(kind: str, fields: dict[str, Any]) -> bytes:
        # One SSE event, encoded here: JSON has no line breaks to split (sse_starlette's own
        # encoding would look for them), and json.dumps with its defaults is the fast one.
        data = json.dumps({"type": kind, "sequence_number": next(numbers), **fields})
        return f"event: {kind}\ndata: {data}\n\n".encode()

    output = _Output()
    try:
        started = response.object("in_progress")
        yield event("response.created", {"response": started})
        yield event("response.in_progress", {"response": started})
        async for ev in stream:
            for kind, fields in output.feed(ev):
                yield event(kind, fields)
        finished = response.finished(output, stream.usage)
        if body.store:
            await service.save_response(finished, items, key)
        yield event(f"response.{finished['status']}", {"response": finished})
    except ServiceError as e:  # the stream has started: the failure is its last events
        failed = response.object("failed", output.cut(), stream.usage, _failure(e))
        if body.store:
            with contextlib.suppress(ServiceError):
                await service.save_response(failed, items, key)
        yield event("error", {"code": e.code or e.type, "message": e.message, "param": e.param})
        yield event("response.failed", {"response": failed})
    finally:
        stream.close()


async def input_tokens(request: Request) -> Response:
    """What `usage.input_tokens` of a create with this body would be, counted by the
    model's worker and template; nothing is generated."""
    body = await parse_body(request, InputTokensRequest)
    service, key = service_of(request), _key(request)
    history, model = await _history(service, body, key)
    body.model = body.model or model
    if body.model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    counting = service.count_tokens(body.generate_request(history), record_of(request))
    count = await unless_disconnected(request, counting)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": count})


async def retrieve(request: Request) -> Response:
    stored = await service_of(request).stored_response(request.path_params["id"], _key(request))
    return JSONResponse(stored.response)


async def delete(request: Request) -> Response:
    response_id = request.path_params["id"]
    await service_of(request).delete_response(response_id, _key(request))
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


async def input_items(request: Request) -> Response:
    query = request.query_params
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise InvalidRequest("limit must be a whole number.", param="limit") from None
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")
    data, more = await service_of(request).response_input_items(
        request.path_params["id"],
        _key(request),
        limit=limit,
        order=cast(Literal["asc", "desc"], order),
        after=query.get("after"),
    )
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0].get("id") if data else None,
            "last_id": data[-1].get("id") if data else None,
            "has_more": more,
        }
    )


ROUTES = [
    Route("/v1/responses", create, methods=["POST"]),
    # Before /v1/responses/{id}, which would otherwise answer its POST with 405.
    Route("/v1/responses/input_tokens", input_tokens, methods=["POST"]),
    Route("/v1/responses/{id}", retrieve, methods=["GET"]),
    Route("/v1/responses/{id}", delete, methods=["DELETE"]),
    Route("/v1/responses/{id}/input_items", input_items, methods=["GET"]),
]
