"""Ollama's API (/api/*), the protocol of many desktop apps, editor plugins and launchers: bodies
in (ollama_schema.py), the service's events out as Ollama's objects, streamed as NDJSON (one
JSON object a line, `application/x-ndjson`), on by default as in Ollama. Errors are
`{"error": "..."}` with the status (gateway/http/errorshape.py).

Names: Ollama's carry a tag; `name:latest` is `name`, and names are listed with `:latest`.
Durations are nanoseconds, from the stream's own timing (gateway/observe/usage.py). A failure
once a stream has started is its last line, `{"error": "..."}`, which Ollama's clients raise."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.engine.protocol import Finished, Reasoning, Text, ToolCallArgs, ToolCallStart
from gateway.engine.request import EmbeddingRequest, Embeddings
from gateway.errors import InvalidRequest, ServiceError
from gateway.http.handler import (
    ClientDisconnected,
    arguments_object,
    parse_body,
    record_of,
    service_of,
    unless_disconnected,
)
from gateway.http.ollama_schema import (
    ChatRequest,
    CopyBody,
    CreateBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    ModelBody,
    PullBody,
    model_name,
)
from gateway.observe.requestlog import RequestRecord
from gateway.observe.usage import Usage
from gateway.service.backend import Stream

# The Ollama API version this face follows (apps check it before using tools or thinking).
OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}
# Profile fields that describe it rather than set a default: not copied into another profile.
_NOT_COPIED = {"name", "aliases", "created", "updated", "error", "pinned"}
B = TypeVar("B", bound=BaseModel)


def created_at() -> str:
    """RFC 3339 in UTC with nanoseconds, as Ollama writes its times."""
    ns = time.time_ns()
    return f"{datetime.fromtimestamp(ns // 10**9, UTC):%Y-%m-%dT%H:%M:%S}.{ns % 10**9:09d}Z"


def _iso(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds or 0, UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _digest(name: str) -> str:
    """A stable stand-in for Ollama's manifest digest: models here have no manifest."""
    return hashlib.sha256(name.encode()).hexdigest()


def _invalid(e: ValidationError) -> InvalidRequest:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPES))]
    param = ".".join(loc) or None
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    message = err["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"Invalid value for '{param}': {message}.", param=param)


_TYPES = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal['', 'json']"}


async def _body(request: Request, schema: type[B]) -> B:
    return await parse_body(request, schema, _invalid)


def _target(body: ModelBody) -> str:
    try:
        return body.target()
    except ValueError:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model") from None


def _lines(objects: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def encoded() -> AsyncIterator[str]:
        async for obj in objects:
            yield json.dumps(obj) + "\n"

    return StreamingResponse(encoded(), media_type=NDJSON)


async def _listed(items: Iterable[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


# Generation -----------------------------------------------------------------------------------


def _timings(usage: Usage, record: RequestRecord, end: float) -> dict[str, int]:
    """Ollama's counts and durations: the whole request, the wait for the model to load, the
    prompt (until the first output) and the rest."""
    started = usage.started if usage.started is not None else record.t0
    first = usage.first_token if usage.first_token is not None else end
    return {
        "total_duration": _ns(end - record.t0),
        "load_duration": _ns(usage.load_seconds),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": _ns(first - started),
        "eval_count": usage.completion_tokens,
        "eval_duration": _ns(end - first),
    }


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": arguments_object(arguments)}}


class _Answer:
    """What differs between /api/chat (a `message`) and /api/generate (a `response`)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat

    def piece(
        self,
        text: str = "",
        thinking: str | None = None,
        calls: list[dict[str, Any]] | None = None,
        done: bool = False,
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            obj["message"] = message
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
        obj["done"] = done
        return obj

    @staticmethod
    def ending(reason: str | None, usage: Usage, record: RequestRecord) -> dict[str, Any]:
        """The fields of the last object: why it ended, the counts and durations."""
        return {
            "done_reason": DONE_REASONS.get(reason or "stop", reason),
            **_timings(usage, record, time.perf_counter()),
        }


async def _generate(request: Request, body: ChatRequest | GenerateBody) -> Response:
    chat = isinstance(body, ChatRequest)
    if not (body.messages if isinstance(body, ChatRequest) else body.prompt):
        return await _load_or_unload(request, body, chat)
    generate = body.generate_request()
    record = record_of(request)
    answer = _Answer(body.model, chat)
    stream = await unless_disconnected(request, service_of(request).generate(generate, record))
    if body.stream:
        return _lines(_stream(stream, answer, record))
    (choice,) = await unless_disconnected(request, stream.collect())
    calls = [_call(name, args) for _, name, args in choice.tool_calls]
    whole = answer.piece(choice.text, choice.reasoning or None, calls, done=True)
    return JSONResponse({**whole, **answer.ending(choice.finish_reason, stream.usage, record)})


async def _stream(
    stream: Stream, answer: _Answer, record: RequestRecord
) -> AsyncIterator[dict[str, Any]]:
    """Text and thinking as they come; a tool call whole, once its arguments are complete (the
    next call starts or the answer ends), as Ollama sends them."""
    reason: str | None = None
    call: list[str] | None = None  # [name, arguments so far]
    try:
        async for ev in stream:
            if isinstance(ev, ToolCallStart):
                if call is not None:
                    yield answer.piece(calls=[_call(*call)])
                call = [ev.name, ""]
            elif isinstance(ev, ToolCallArgs):
                if call is not None:
                    call[1] += ev.text
            elif isinstance(ev, Text):
                yield answer.piece(ev.text)
            elif isinstance(ev, Reasoning):
                yield answer.piece(thinking=ev.text)
            elif isinstance(ev, Finished):
                reason = ev.reason
        if call is not None:
            yield answer.piece(calls=[_call(*call)])
        yield {**answer.piece(done=True), **answer.ending(reason, stream.usage, record)}
    except ServiceError as e:  # the stream has started: the error is its last line
        yield {"error": e.message}
    finally:
        stream.close()


async def _load_or_unload(
    request: Request, body: ChatRequest | GenerateBody, chat: bool
) -> Response:
    """No messages (or an empty prompt): Ollama loads the model, or with keep_alive 0 unloads
    it, and answers with done_reason "load" or "unload"."""
    service = service_of(request)
    if body.keep_alive_seconds == 0:
        await service.unload(body.name)
        reason = "unload"
    else:
        await service.load(body.name)
        reason = "load"
    return JSONResponse({**_Answer(body.model, chat).piece(done=True), "done_reason": reason})


async def chat(request: Request) -> Response:
    return await _generate(request, await _body(request, ChatRequest))


async def generate(request: Request) -> Response:
    return await _generate(request, await _body(request, GenerateBody))


# Models ---------------------------------------------------------------------------------------


def _details(model: dict[str, Any] | None, parent: str = "") -> dict[str, Any]:
    model = model or {}
    family = model.get("family") or ""
    bits = model.get("quantization_bits")
    return {
        "parent_model": parent,
        "format": "mlx",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": model.get("parameter_size", ""),
        "quantization_level": f"Q{bits}" if bits else "",
    }


async def tags(request: Request) -> Response:
    service = service_of(request)
    models = {m["id"]: m for m in await service.list_models()}
    listed = []
    for e in await service.names():
        model = models.get(e["model"] if "profile" in e else e["id"])
        name = e["id"] + ":latest"
        listed.append(
            {
                "name": name,
                "model": name,
                "modified_at": _iso((model or {}).get("created") or e.get("created")),
                "size": (model or {}).get("size_bytes") or 0,
                "digest": _digest(e["id"]),
                "details": _details(model, e.get("model", "") if "profile" in e else ""),
            }
        )
    return JSONResponse({"models": listed})


async def show(request: Request) -> Response:
    name = _target(await _body(request, ModelBody))
    service = service_of(request)
    info = await service.model_info(name)
    profile = await service.get_profile(info["profile"]) if "profile" in info else {}
    parameters = {
        "temperature": profile.get("temperature"),
        "top_p": profile.get("top_p"),
        "num_predict": profile.get("max_tokens"),
        "num_ctx": profile.get("context_length"),
    }
    parameter_lines = [f"{k} {v}" for k, v in parameters.items() if v is not None]
    modelfile = [f"# Modelfile of {name} (mlx-manager)", f"FROM {info['path']}"]
    modelfile += [f"PARAMETER {line}" for line in parameter_lines]
    if profile.get("system_prompt"):
        modelfile.append(f'SYSTEM """{profile["system_prompt"]}"""')
    family = info.get("family") or "model"
    # As Ollama lists them: an embedding model only embeds (apps pick embedders by this); a
    # reranker has no Ollama capability.
    capabilities = {"embedding": ["embedding"], "reranker": []}.get(info.get("kind") or "", [])
    if info.get("kind") in (None, "chat"):
        capabilities = ["completion"]
        capabilities += ["tools"] if info.get("tool_calling") else []
        capabilities += ["thinking"] if info.get("reasoning") else []
    model_info: dict[str, Any] = {
        "general.architecture": family,
        "general.basename": info["id"],
        "general.parameter_count": info.get("parameters"),
        f"{family}.context_length": info.get("context_length"),
        f"{family}.vocab_size": info.get("vocab_size"),
    }
    details = _details(
        {
            "family": info.get("family"),
            "quantization_bits": (info.get("quantization") or {}).get("bits"),
            "parameter_size": _parameter_size(info.get("parameters")),
        },
        info["id"] if profile else "",
    )
    return JSONResponse(
        {
            "license": "",
            "modelfile": "\n".join(modelfile) + "\n",
            "parameters": "\n".join(parameter_lines),
            # The chat template is the model's own (its tokenizer's Jinja), not Ollama's Go
            # template language: it is not shown here.
            "template": "",
            "system": profile.get("system_prompt") or "",
            "details": details,
            "model_info": {k: v for k, v in model_info.items() if v is not None},
            "capabilities": capabilities,
        }
    )


def _parameter_size(count: int | None) -> str:
    if not count:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


async def ps(request: Request) -> Response:
    """Loaded models. MLX uses unified memory: a model's memory is all "VRAM" on a Mac."""
    service = service_of(request)
    names = {e["id"]: e for e in await service.names()}
    running = []
    for s in await service.list_loaded():
        if s["state"] != "ready":
            continue
        left = s.get("ttl_remaining_seconds")
        # Busy, or no TTL: Ollama shows a model kept loaded as expiring far in the future.
        expires = time.time() + left if left is not None else 2**33
        size = s.get("memory_bytes") or s.get("estimated_bytes") or 0
        name = s["model"] + ":latest"
        running.append(
            {
                "name": name,
                "model": name,
                "size": size,
                "size_vram": size,
                "digest": _digest(s["model"]),
                "details": _details(None),
                "expires_at": _iso(expires),
                "context_length": (names.get(s["model"]) or {}).get("context_length"),
            }
        )
    return JSONResponse({"models": running})


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


# Downloads, copies, profiles ------------------------------------------------------------------


async def pull(request: Request) -> Response:
    """A download from the Hugging Face hub (the name is a repo, `org/name`), its progress as
    Ollama's status lines: one layer, the whole model, with its bytes total and completed."""
    body = await _body(request, PullBody)
    repo = _target(body)
    service = service_of(request)
    progress: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def report(status: dict[str, Any]) -> None:
        progress.put_nowait(status)

    work = asyncio.ensure_future(service.download_model(repo, report))
    # Until it has started, a failure (a bad name, the hub unreachable) is a plain HTTP error.
    first = asyncio.ensure_future(progress.get())
    try:
        await unless_disconnected(
            request, asyncio.wait({work, first}, return_when=asyncio.FIRST_COMPLETED)
        )
    except ClientDisconnected:
        first.cancel()
        work.cancel()
        return Response(status_code=499)
    if work.done() and work.exception() is not None:
        first.cancel()
        work.result()  # raises: answered by the app's error handler
    digest = "sha256:" + _digest(repo)

    def line(status: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": f"pulling {digest[7:19]}",
            "digest": digest,
            "total": status["bytes_total"],
            "completed": status["bytes_done"],
        }

    def failure(result: dict[str, Any]) -> str:
        return result.get("error") or f"the download of {repo} was {result['status']}"

    if not body.stream:
        first.cancel()
        result = await work
        if result["status"] != "done":
            raise ServiceError(failure(result))
        return JSONResponse({"status": "success"})

    async def lines() -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"status": "pulling manifest"}
            waiting: asyncio.Future[Any] = first
            while True:
                await asyncio.wait({work, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield line(waiting.result())
                    waiting = asyncio.ensure_future(progress.get())
                    continue
                while not progress.empty():
                    yield line(progress.get_nowait())
                break
            waiting.cancel()
            try:
                result = work.result()
            except ServiceError as e:
                yield {"error": e.message}
                return
            if result["status"] != "done":
                yield {"error": failure(result)}
                return
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                yield {"status": status}
        finally:
            # The client left: the download carries on in the service (like /admin's).
            work.cancel()

    return _lines(lines())


async def delete(request: Request) -> Response:
    """A profile (a copy or a create) or one of its aliases goes; a model name deletes the
    model from the Hugging Face cache, unloading it first."""
    name = _target(await _body(request, ModelBody))
    service = service_of(request)
    for p in await service.list_profiles():
        if p["name"] == name:
            await service.delete_profile(name)
            return Response(status_code=200)
        if name in p["aliases"]:
            aliases = [a for a in p["aliases"] if a != name]
            await service.update_profile(p["name"], {"aliases": aliases})
            return Response(status_code=200)
    await service.delete_model(name, unload=True)
    return Response(status_code=200)


async def _base_of(request: Request, source: str) -> dict[str, Any]:
    """A new profile's fields from what `source` names: another profile's (a copy of it), or
    a model."""
    service = service_of(request)
    entry = await service.name(source)  # 404 for an unknown name
    if "profile" not in entry:
        return {"model": source}
    profile = await service.get_profile(entry["profile"])
    return {k: v for k, v in profile.items() if k not in _NOT_COPIED and v is not None}


async def copy(request: Request) -> Response:
    """A copy is a profile named `destination` over the source's model (and the source
    profile's defaults)."""
    body = await _body(request, CopyBody)
    data = await _base_of(request, model_name(body.source))
    await service_of(request).create_profile({**data, "name": model_name(body.destination)})
    return Response(status_code=200)


async def create(request: Request) -> Response:
    """A Modelfile's FROM, SYSTEM and some PARAMETERs, as a profile (made, or changed when it
    exists). What a profile cannot be (built from files, adapters, quantized, another template)
    is refused with a 400 saying why."""
    body = await _body(request, CreateBody)
    name = _target(body)
    why = body.refused()
    if why is not None:
        raise InvalidRequest(why)
    assert body.from_ is not None
    source = model_name(body.from_)
    data = {**await _base_of(request, source), **body.profile_fields()}
    service = service_of(request)
    existing = {p["name"] for p in await service.list_profiles()}
    if name in existing:
        await service.update_profile(name, data)
    else:
        await service.create_profile({**data, "name": name})
    statuses = [{"status": f"using {source}"}, {"status": f"writing profile {name}"}]
    statuses.append({"status": "success"})
    if not body.stream:
        return JSONResponse(statuses[-1])
    return _lines(_listed(statuses))


async def embed(request: Request) -> Response:
    body = await _body(request, EmbedBody)
    if not body.texts():  # nothing to embed: Ollama loads the model and answers no vectors
        await service_of(request).load(body.embedding_request().model)
        return JSONResponse({"model": body.model, "embeddings": []})
    result = await _embeddings(request, body.embedding_request())
    record = record_of(request)
    return JSONResponse(
        {
            "model": body.model,
            "embeddings": result.floats(),
            "total_duration": _ns(time.perf_counter() - record.t0),
            "load_duration": _ns(result.load_seconds),
            "prompt_eval_count": result.prompt_tokens,
        }
    )


async def embeddings(request: Request) -> Response:
    body = await _body(request, EmbeddingsBody)
    if not body.prompt:  # as Ollama: an empty prompt has an empty embedding
        return JSONResponse({"embedding": []})
    result = await _embeddings(request, body.embedding_request())
    return JSONResponse({"embedding": result.floats()[0]})


async def _embeddings(request: Request, embedding: EmbeddingRequest) -> Embeddings:
    work = service_of(request).embed(embedding, record_of(request))
    return await unless_disconnected(request, work)


ROUTES = [
    Route("/api/version", version),
    Route("/api/tags", tags),
    Route("/api/ps", ps),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/pull", pull, methods=["POST"]),
    Route("/api/delete", delete, methods=["DELETE"]),
    Route("/api/copy", copy, methods=["POST"]),
    Route("/api/create", create, methods=["POST"]),
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embeddings, methods=["POST"]),
]
