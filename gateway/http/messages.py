"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), the protocol
of Claude Code and the `anthropic` SDKs: bodies in (messages_schema.py), the service's events out
as a message or as Anthropic's stream of server-sent events.

A stream has to answer while a model loads or a long prompt is read, or clients give up: it
waits a moment for generation to start (so that a request that fails at once gets a plain HTTP
error with its status), then opens and sends `ping` events until the first real one. Anthropic's
SDKs skip pings wherever they come, before `message_start` too (their SSE decoders drop them).
A failure once the stream is open is its last event, `event: error`.

Usage follows Anthropic's meaning: `input_tokens` are the prompt tokens not read from the prompt
cache, `cache_read_input_tokens` those that were (their sum is the prompt's length);
`cache_creation_input_tokens` is always 0 (this server caches without being asked). count_tokens
answers the prompt's whole length: what a create with the same input reports as
`input_tokens` when nothing of it is cached yet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.engine.protocol import Finished, Output, Reasoning, Text, ToolCallArgs, ToolCallStart
from gateway.errors import InvalidRequest, ServiceError
from gateway.http.errorshape import anthropic_body
from gateway.http.handler import (
    ClientDisconnected,
    arguments_object,
    parse_body,
    record_of,
    service_of,
    unless_disconnected,
)
from gateway.http.messages_schema import BLOCK_TYPES, CountTokensRequest, MessagesRequest
from gateway.observe.usage import Usage
from gateway.service.backend import Stream

# Seconds a stream waits for generation to start before it opens and pings (at most one ping
# interval): a failure within it is a plain HTTP error.
START_WAIT = 1.5
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
Event = tuple[str, dict[str, Any]]  # an SSE event's type and data
B = TypeVar("B", bound=BaseModel)


def _ping() -> ServerSentEvent:
    return ServerSentEvent(data='{"type": "ping"}', event="ping", sep="\n")


def _sse(kind: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=kind, sep="\n")


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


def _tool_id(call_id: str) -> str:
    """Anthropic's ids start with toolu_; the engine's with call_ (OpenAI's)."""
    return "toolu_" + call_id.removeprefix("call_")


class _Message:
    """One answer, built from the service's events in order: the content blocks a non-streamed
    answer returns, and the stream events that build the same blocks (one path for both, so
    that a stream put together is the whole answer)."""

    def __init__(self, model: str, omit_thinking: bool = False) -> None:
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.model = model
        self.omit_thinking = omit_thinking
        self.content: list[dict[str, Any]] = []
        self.open = False  # the last block is still being written
        self.arguments = ""  # the open tool_use block's input so far, as JSON text
        self.finished: Finished | None = None

    def feed(self, ev: Output) -> list[Event]:
        if isinstance(ev, Text):
            return self._write("text", "text", ev.text)
        if isinstance(ev, Reasoning):
            return self._write("thinking", "thinking", ev.text)
        if isinstance(ev, ToolCallStart):
            block = {"type": "tool_use", "id": _tool_id(ev.call_id), "name": ev.name, "input": {}}
            events = self._start(block)  # closes the previous call with its arguments
            self.arguments = ""
            return events
        if isinstance(ev, ToolCallArgs):
            if not ev.text:
                return []
            self.arguments += ev.text
            delta = {"type": "input_json_delta", "partial_json": ev.text}
            return [self._delta(delta)]
        assert isinstance(ev, Finished)
        self.finished = ev
        return self._stop()

    def _write(self, kind: str, key: str, text: str) -> list[Event]:
        if not text:
            return []
        events: list[Event] = []
        if not (self.open and self.content[-1]["type"] == kind):
            block = {"type": kind, key: ""}
            if kind == "thinking":
                block["signature"] = ""  # Anthropic signs thinking; nothing to sign here
            events = self._start(block)
        if kind == "thinking" and self.omit_thinking:
            return events
        self.content[-1][key] += text
        events.append(self._delta({"type": f"{kind}_delta", key: text}))
        return events

    def _start(self, block: dict[str, Any]) -> list[Event]:
        events = self._stop()
        self.content.append(block)
        self.open = True
        # A copy: the block grows as deltas come, the event shows where it starts.
        start = {"type": "content_block_start", "index": self._index, "content_block": dict(block)}
        events.append(("content_block_start", start))
        return events

    def _delta(self, delta: dict[str, Any]) -> Event:
        data = {"type": "content_block_delta", "index": self._index, "delta": delta}
        return ("content_block_delta", data)

    def _stop(self) -> list[Event]:
        if not self.open:
            return []
        self.open = False
        block, events = self.content[-1], []
        if block["type"] == "thinking":  # Anthropic closes a thinking block with its signature
            events.append(self._delta({"type": "signature_delta", "signature": ""}))
        elif block["type"] == "tool_use":
            block["input"] = arguments_object(self.arguments)
        events.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        return events

    @property
    def _index(self) -> int:
        return len(self.content) - 1

    def stop_reason(self) -> tuple[str, str | None]:
        fin = self.finished
        if fin is None:
            return "end_turn", None
        if fin.reason == "stop" and fin.stop_sequence is not None:
            return "stop_sequence", fin.stop_sequence
        return STOP_REASONS.get(fin.reason, "end_turn"), None

    def head(self, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }

    def whole(self, usage: Usage) -> dict[str, Any]:
        reason, sequence = self.stop_reason()
        return {
            **self.head(_usage(usage)),
            "content": self.content,
            "stop_reason": reason,
            "stop_sequence": sequence,
        }

    def start_event(self, usage: Usage) -> Event:
        return ("message_start", {"type": "message_start", "message": self.head(_usage(usage))})

    def end_events(self, usage: Usage) -> list[Event]:
        reason, sequence = self.stop_reason()
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": _usage(usage),  # totals, as Anthropic's are
        }
        return [*self._stop(), ("message_delta", delta), ("message_stop", {"type": "message_stop"})]

    async def collect(self, stream: Stream) -> None:
        async for ev in stream:
            self.feed(ev)
        self._stop()


def _invalid(e: ValidationError) -> InvalidRequest:
    """The most specific of the errors (the deepest: a bad block rather than "not a string"),
    with its field's path as Anthropic names it (messages.0.content.1.tool_use_id)."""
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    param = ".".join(_path(err["loc"])) or None
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    message = err["msg"].removeprefix("Value error, ")  # our validators' own words
    if param is None:  # a rule across fields (tool_choice and tools)
        return InvalidRequest(message + ".")
    return InvalidRequest(f"Invalid value for '{param}': {message}.", param=param)


def _path(loc: tuple[int | str, ...]) -> list[str]:
    """A location without the parts that name which member of a union failed: a type (`str`,
    `list[...]`), or a block's type right after its index (`content.0.text.text` is the text
    block's `text`)."""
    path: list[str] = []
    for i, part in enumerate(loc):
        after_index = i > 0 and isinstance(loc[i - 1], int)
        if isinstance(part, str) and (
            "[" in part or part in _TYPES or (after_index and part in BLOCK_TYPES)
        ):
            continue
        path.append(str(part))
    return path


_TYPES = {"str", "int", "float", "bool", "list", "dict", "function-after"}


async def create(request: Request) -> Response:
    body = await parse_body(request, MessagesRequest, _invalid)
    generate = body.generate_request()
    message = _Message(body.model, body.omit_thinking)
    record = record_of(request)
    work = asyncio.ensure_future(service_of(request).generate(generate, record))
    if not body.stream:
        stream = await unless_disconnected(request, work)
        await unless_disconnected(request, message.collect(stream))
        return JSONResponse(message.whole(stream.usage))

    ping = request.app.state.settings.stream_ping_interval
    try:
        # Within the window a failure is a plain HTTP error; after it, the stream opens.
        window = min(START_WAIT, ping) if ping > 0 else None
        await unless_disconnected(request, asyncio.wait({work}, timeout=window))
    except ClientDisconnected:
        await _discard(work)
        return Response(status_code=499)
    if work.done():
        work.result()  # raises the failure, answered by the app's error handler
    return EventSourceResponse(
        _events(work, message, request),
        ping=ping,
        ping_message_factory=_ping,
        sep="\n",
    )


async def _events(
    work: asyncio.Future[Stream], message: _Message, request: Request
) -> AsyncIterator[ServerSentEvent]:
    stream: Stream | None = None
    try:
        if not work.done():
            yield _ping()  # opened before generation started: say so at once
        try:
            stream = await work
        except ServiceError as e:  # the load or the queue failed once the stream was open
            record_of(request).failed(e.status, e.message)
            raise
        yield _sse(*message.start_event(stream.usage))
        async for ev in stream:
            for event in message.feed(ev):
                yield _sse(*event)
        for event in message.end_events(stream.usage):
            yield _sse(*event)
    except ServiceError as e:  # the stream has started: the error is its last event
        yield _sse("error", anthropic_body(e))
    finally:
        if stream is not None:
            stream.close()
        else:
            await _discard(work)


async def _discard(work: asyncio.Future[Stream]) -> None:
    """Give up a generation that may not have started: out of its queue, or closed."""
    if not work.done():
        work.cancel()
    with contextlib.suppress(asyncio.CancelledError, ServiceError):
        (await work).close()


async def count_tokens(request: Request) -> Response:
    body = await parse_body(request, CountTokensRequest, _invalid)
    work = service_of(request).count_tokens(body.generate_request(), record_of(request))
    counted = await unless_disconnected(request, work)
    return JSONResponse({"input_tokens": counted})


ROUTES = [
    Route("/v1/messages", create, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
