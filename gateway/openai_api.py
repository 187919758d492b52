"""The /v1 protocol: validate requests, hand them to the pool, shape responses and SSE chunks,
and turn every failure into an OpenAI error body with the right status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import jsonbody
from gateway.errors import InvalidRequest, ServiceError, UnsupportedMediaType
from gateway.generation import Choice
from gateway.pool import Generation, ModelPool
from gateway.requestlog import RequestRecord, content_of
from gateway.schemas import ChatCompletionRequest, CompletionRequest

B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")
SSE_PING_SECONDS = 15


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def _record(request: Request) -> RequestRecord:
    """The request's record (gateway/middleware.py), or a detached one outside the app."""
    record = getattr(request.state, "record", None)
    return record if record is not None else RequestRecord(request.url.path)


async def json_object(request: Request) -> dict[str, Any]:
    """Every JSON body of /v1 and /admin is parsed here, strictly (gateway/jsonbody.py)."""
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


async def parse_body(request: Request, schema: type[B]) -> B:
    data = await json_object(request)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> InvalidRequest:
    err = e.errors()[0]
    # Union members add their type name to the location; a person wants the field path.
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPES))]
    param = ".".join(loc) or None
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param)


_TYPES = {"str", "int", "float", "bool", "list", "dict", "function-after", "TextPart"}


# Models ---------------------------------------------------------------------------------------


def model_entries(pool: ModelPool) -> list[dict[str, Any]]:
    """Every name a request can use: local models, then profiles (marked `owned_by: profile`)."""
    loaded = {s["path"] for s in pool.status() if s["state"] == "ready"}
    entries = []
    models = [m for m in pool.catalog.models() if pool.allowed(m.id)]
    for m in models:
        entries.append(
            {
                "id": m.id,
                "object": "model",
                "created": m.created,
                "owned_by": m.id.split("/")[0] if "/" in m.id else "local",
                "loaded": str(m.path) in loaded,
                "context_length": m.context_length,
                "size_bytes": m.size_bytes,
                **({"description": m.description} if m.description else {}),
            }
        )
    # Each name once: a profile name or alias that a model id takes is not usable, so not listed.
    for name, p, model in pool.catalog.profile_names():
        entries.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "profile",
                "model": p["model"],
                "loaded": model is not None and str(model.path) in loaded,
            }
        )
    return entries


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": model_entries(_pool(request))})


async def get_model(request: Request) -> Response:
    pool = _pool(request)
    name = request.path_params["model_id"]
    resolved = pool.resolve(name)  # raises model_not_found with close matches
    for entry in model_entries(pool):
        if entry["id"] == name:
            return JSONResponse(entry)
    # An absolute path: not listed, but usable.
    return JSONResponse(
        {
            "id": name,
            "object": "model",
            "created": resolved.model.created,
            "owned_by": "local",
            "loaded": pool.is_loaded(resolved),
            "context_length": resolved.model.context_length,
        }
    )


# Generation -----------------------------------------------------------------------------------


class ClientDisconnected(Exception):
    pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
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


def _usage(gen: Generation, n: int, completion_tokens: int) -> dict[str, Any]:
    prompt, cached = gen.prompt_usage(n)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _chat_logprobs(entries: list[Any]) -> dict[str, Any]:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return {
        "content": [
            {**item(t, lp), "top_logprobs": [item(tt, tlp) for tt, tlp in top]}
            for t, lp, top in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: list[Any], offset: int = 0) -> dict[str, Any]:
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

    def chunk_renderer(self, n: int) -> Callable[[tuple[Any, ...]], str]:
        """Renders one stream event as the JSON of one choice of a chunk (hot path)."""
        if self.chat:

            def chat(ev: tuple[Any, ...]) -> str:
                if ev[0] == "r":
                    return (
                        f'{{"index": {ev[1]}, "delta": '
                        f'{{"reasoning_content": {json.dumps(ev[2])}}}, '
                        '"logprobs": null, "finish_reason": null}'
                    )
                if ev[0] == "f":
                    return (
                        f'{{"index": {ev[1]}, "delta": {{}}, "logprobs": null, '
                        f'"finish_reason": "{ev[2]}"}}'
                    )
                lp = json.dumps(_chat_logprobs([ev[3]])) if ev[3] is not None else "null"
                return (
                    f'{{"index": {ev[1]}, "delta": {{"content": {json.dumps(ev[2])}}}, '
                    f'"logprobs": {lp}, "finish_reason": null}}'
                )

            return chat
        offsets = [0] * n  # text_offset of each choice's next token

        def completion(ev: tuple[Any, ...]) -> str:
            if ev[0] == "f":
                return (
                    f'{{"index": {ev[1]}, "text": "", "logprobs": null, '
                    f'"finish_reason": "{ev[2]}"}}'
                )
            lp = "null"
            if ev[3] is not None:
                lp = json.dumps(_completion_logprobs([ev[3]], offsets[ev[1]]))
                offsets[ev[1]] += len(ev[3][0])
            return (
                f'{{"index": {ev[1]}, "text": {json.dumps(ev[2])}, "logprobs": {lp}, '
                '"finish_reason": null}'
            )

        return completion

    @staticmethod
    def tool_call_chunk(ev: tuple[Any, ...], position: int) -> str:
        """One piece of a streamed tool call: its id and name first ("tc"), then its arguments
        as they are written ("ta"). Each call of a choice has its own `index`."""
        call: dict[str, Any] = {"index": position}
        if ev[0] == "tc":
            call |= {"id": ev[2], "type": "function", "function": {"name": ev[3], "arguments": ""}}
        else:
            call["function"] = {"arguments": ev[2]}
        return json.dumps(
            {
                "index": ev[1],
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
        record = _record(request)
        body = await parse_body(request, self.schema)
        record.model, record.stream = body.model, bool(body.stream)
        pool = _pool(request)
        resolved = pool.resolve(body.model)
        record.resolved(resolved)
        keep_text = request.app.state.settings.log_content
        if keep_text:
            asked = body.prompt if not self.chat else body.model_dump(exclude_none=True)["messages"]
            record.prompt = content_of(asked)
        meta = _Meta(self.prefix, body.model)
        work = pool.generate(resolved, body.generation_requests(), body.keep_alive_seconds)
        try:
            if body.stream:
                gen = await _unless_disconnected(request, work)
                return EventSourceResponse(
                    self._stream(gen, meta, body, record, keep_text),
                    ping=SSE_PING_SECONDS,
                    sep="\n",
                )
            gen, choices = await _unless_disconnected(request, _collect(work, record, body.n))
        except ClientDisconnected:
            return Response(status_code=499)
        if keep_text:
            record.completion = _texts([c.text for c in choices])
        return JSONResponse(
            {
                **meta.head(self.obj),
                "choices": [self.choice(c, body) for c in choices],
                "usage": _usage(gen, body.n, sum(c.completion_tokens for c in choices)),
            }
        )

    async def _stream(
        self, gen: Generation, meta: _Meta, body: Any, record: RequestRecord, keep_text: bool
    ) -> AsyncIterator[str]:
        pre, post = meta.chunk_frame(self.chunk_obj, body.include_usage)
        render = self.chunk_renderer(len(gen.requests))
        tokens = 0
        texts: list[list[str]] = [[] for _ in gen.requests]  # only with log_content
        try:
            for first in self.first_chunks(len(gen.requests)):
                yield pre + first + post
            calls = [0] * len(gen.requests)  # tool calls started, per choice
            async for ev in gen:
                if ev[0] in ("tc", "ta"):
                    calls[ev[1]] += ev[0] == "tc"
                    yield pre + self.tool_call_chunk(ev, calls[ev[1]] - 1) + post
                    continue
                if ev[0] == "f":
                    tokens += ev[3]
                elif keep_text and ev[0] == "d":
                    texts[ev[1]].append(ev[2])
                yield pre + render(ev) + post
            if body.include_usage:
                usage = _usage(gen, body.n, tokens)
                yield json.dumps({**meta.head(self.chunk_obj), "choices": [], "usage": usage})
            yield "[DONE]"
        except ServiceError as e:  # the stream has started: the error becomes its last event
            record.failed(e.status, e.message)
            yield json.dumps(e.body())
        finally:
            gen.close()
            record.generated(gen, body.n)
            if keep_text:
                record.completion = _texts(["".join(t) for t in texts])


async def _collect(
    work: Awaitable[Generation], record: RequestRecord, n: int
) -> tuple[Generation, list[Choice]]:
    gen = await work
    try:
        return gen, await gen.collect()
    finally:
        record.generated(gen, n)


def _texts(texts: list[str]) -> str:
    """What the request log keeps of the output: the text, or a JSON list for n > 1."""
    return texts[0] if len(texts) == 1 else content_of(texts)


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
