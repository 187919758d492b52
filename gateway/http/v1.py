"""The /v1 protocol: validate requests, hand them to the pool, shape responses and SSE chunks,
and turn every failure into an OpenAI error body with the right status."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.engine.protocol import Finished, Logprob, Reasoning, Text, ToolCallArgs, ToolCallStart
from gateway.engine.request import Choice
from gateway.errors import ServiceError
from gateway.http.handler import (
    SSE_PING_SECONDS,
    parse_body,
    record_of,
    service_of,
    unless_disconnected,
)
from gateway.http.schemas import ChatCompletionRequest, CompletionRequest
from gateway.observe.usage import Usage
from gateway.service.backend import Stream

# Models ---------------------------------------------------------------------------------------


def _entry(e: dict[str, Any]) -> dict[str, Any]:
    """One name as OpenAI lists a model; profiles are `owned_by: profile`."""
    if "profile" in e:
        return {
            "id": e["id"],
            "object": "model",
            "created": 0,
            "owned_by": "profile",
            "model": e["model"],
            "loaded": e["loaded"],
            "kind": e.get("kind"),
        }
    name = e["id"]
    entry = {
        "id": name,
        "object": "model",
        "created": e["created"],
        "owned_by": name.split("/")[0] if "/" in name and not name.startswith("/") else "local",
        "loaded": e["loaded"],
        "context_length": e["context_length"],
        "kind": e["kind"],
    }
    if "size_bytes" in e:
        entry["size_bytes"] = e["size_bytes"]
    if e.get("description"):
        entry["description"] = e["description"]
    return entry


async def list_models(request: Request) -> Response:
    names = await service_of(request).names()
    return JSONResponse({"object": "list", "data": [_entry(e) for e in names]})


async def get_model(request: Request) -> Response:
    return JSONResponse(_entry(await service_of(request).name(request.path_params["model_id"])))


# Generation -----------------------------------------------------------------------------------


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def _chat_logprobs(entries: list[Logprob]) -> dict[str, Any]:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return {
        "content": [
            {**item(t, lp), "top_logprobs": [item(tt, tlp) for tt, tlp in top]}
            for t, lp, top in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: list[Logprob], offset: int = 0) -> dict[str, Any]:
    offsets = []
    for t, _, _ in entries:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{tt: tlp for tt, tlp in top} for _, _, top in entries],
        "text_offset": offsets,
    }


class _Endpoint:
    """What differs between /v1/chat/completions and /v1/completions: the schema, object names
    and how one choice is rendered. Everything else is shared."""

    def __init__(self, schema: type[ChatCompletionRequest] | type[CompletionRequest]) -> None:
        self.schema = schema
        self.chat = schema is ChatCompletionRequest
        self.prefix = "chatcmpl" if self.chat else "cmpl"
        self.obj = "chat.completion" if self.chat else "text_completion"
        self.chunk_obj = "chat.completion.chunk" if self.chat else "text_completion"

    def choice(self, c: Choice, body: Any) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                # With tool calls and nothing else to say, content is null, as OpenAI sends it.
                "content": c.text if c.text or not c.tool_calls else None,
                "refusal": None,
            }
            if c.reasoning:
                message["reasoning_content"] = c.reasoning
            if c.tool_calls:
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                    for i, n, a in c.tool_calls
                ]
            return {
                "index": c.index,
                "message": message,
                "logprobs": _chat_logprobs(c.logprobs) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
        return {
            "index": c.index,
            "text": c.text,
            "logprobs": _completion_logprobs(c.logprobs) if body.logprobs is not None else None,
            "finish_reason": c.finish_reason,
        }

    def chunk_renderer(self, n: int) -> Callable[[Text | Reasoning | Finished], str]:
        """Renders one stream event as the JSON of one choice of a chunk (hot path)."""
        if self.chat:

            def chat(ev: Text | Reasoning | Finished) -> str:
                if isinstance(ev, Text):
                    lp = "null"
                    if ev.logprob is not None:
                        lp = json.dumps(_chat_logprobs([ev.logprob]))
                    return (
                        f'{{"index": {ev.seq}, "delta": {{"content": {json.dumps(ev.text)}}}, '
                        f'"logprobs": {lp}, "finish_reason": null}}'
                    )
                if isinstance(ev, Reasoning):
                    return (
                        f'{{"index": {ev.seq}, "delta": '
                        f'{{"reasoning_content": {json.dumps(ev.text)}}}, '
                        '"logprobs": null, "finish_reason": null}'
                    )
                return (
                    f'{{"index": {ev.seq}, "delta": {{}}, "logprobs": null, '
                    f'"finish_reason": "{ev.reason}"}}'
                )

            return chat
        offsets = [0] * n  # text_offset of each choice's next token

        def completion(ev: Text | Reasoning | Finished) -> str:
            if isinstance(ev, Finished):
                return (
                    f'{{"index": {ev.seq}, "text": "", "logprobs": null, '
                    f'"finish_reason": "{ev.reason}"}}'
                )
            lp = "null"
            if isinstance(ev, Text) and ev.logprob is not None:
                lp = json.dumps(_completion_logprobs([ev.logprob], offsets[ev.seq]))
                offsets[ev.seq] += len(ev.logprob.token)
            return (
                f'{{"index": {ev.seq}, "text": {json.dumps(ev.text)}, "logprobs": {lp}, '
                '"finish_reason": null}'
            )

        return completion

    @staticmethod
    def tool_call_chunk(ev: ToolCallStart | ToolCallArgs, position: int) -> str:
        """One piece of a streamed tool call: its id and name first, then its arguments as
        they are written. Each call of a choice has its own `index`."""
        call: dict[str, Any] = {"index": position}
        if isinstance(ev, ToolCallStart):
            function = {"name": ev.name, "arguments": ""}
            call |= {"id": ev.call_id, "type": "function", "function": function}
        else:
            call["function"] = {"arguments": ev.text}
        return json.dumps(
            {
                "index": ev.seq,
                "delta": {"tool_calls": [call]},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def first_chunks(self, n: int) -> list[str]:
        """Chat streams open each choice with the assistant role."""
        if not self.chat:
            return []
        return [
            f'{{"index": {i}, "delta": {{"role": "assistant", "content": ""}}, '
            '"logprobs": null, "finish_reason": null}'
            for i in range(n)
        ]

    async def handle(self, request: Request) -> Response:
        body = await parse_body(request, self.schema)
        meta = _Meta(self.prefix, body.model)
        generate = body.generate_request()
        work = service_of(request).generate(generate, record_of(request))
        stream = await unless_disconnected(request, work)
        if body.stream:
            return EventSourceResponse(
                self._stream(stream, meta, len(generate.choices), body.include_usage),
                ping=SSE_PING_SECONDS,
                sep="\n",
            )
        choices = await unless_disconnected(request, stream.collect())
        return JSONResponse(
            {
                **meta.head(self.obj),
                "choices": [self.choice(c, body) for c in choices],
                "usage": _usage(stream.usage),
            }
        )

    async def _stream(
        self, stream: Stream, meta: _Meta, choices: int, include_usage: bool
    ) -> AsyncIterator[str]:
        pre, post = meta.chunk_frame(self.chunk_obj, include_usage)
        render = self.chunk_renderer(choices)
        try:
            for first in self.first_chunks(choices):
                yield pre + first + post
            calls = [0] * choices  # tool calls started, per choice
            async for ev in stream:
                if isinstance(ev, ToolCallStart | ToolCallArgs):
                    calls[ev.seq] += isinstance(ev, ToolCallStart)
                    yield pre + self.tool_call_chunk(ev, calls[ev.seq] - 1) + post
                    continue
                yield pre + render(ev) + post
            if include_usage:
                usage = _usage(stream.usage)
                yield json.dumps({**meta.head(self.chunk_obj), "choices": [], "usage": usage})
            yield "[DONE]"
        except ServiceError as e:  # the stream has started: the error becomes its last event
            yield json.dumps(e.body())
        finally:
            stream.close()


class _Meta:
    def __init__(self, prefix: str, model: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model

    def head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "mlx-manager",
        }

    def chunk_frame(self, obj: str, include_usage: bool) -> tuple[str, str]:
        """JSON text before and after a chunk's `choices` list: rendered once per request,
        since chunks are written once per token."""
        head = json.dumps(self.head(obj))[:-1]
        return head + ', "choices": [', "]" + (', "usage": null}' if include_usage else "}")


chat_completions = _Endpoint(ChatCompletionRequest).handle
completions = _Endpoint(CompletionRequest).handle


ROUTES = [
    Route("/v1/models", list_models),
    Route("/v1/models/{model_id:path}", get_model),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
