"""The service layer: every operation a person, an assistant or a client can ask for, once. The
HTTP routes, the MCP tools and the CLI are thin faces over a Service.

A Service takes a backend for what workers and downloads do: the pool in this process (inside
`mlx-manager serve`, or `mlx-manager mcp` when no server runs) or a running server over HTTP
(backend.py, remote.py), and does not ask which. Profiles, keys and the request
log live in the shared database and are read here in both cases.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import psutil

from config.files import private_dir
from config.settings import Settings, parse_duration
from config.store import DatabaseFull, Store, timestamp
from gateway import errors
from gateway.catalog.hub import DownloadProgress, delete_from_cache, search
from gateway.catalog.local import LocalModel, inspect_model
from gateway.catalog.names import Catalog
from gateway.catalog.profiles import Profiles
from gateway.engine.request import (
    EmbeddingRequest,
    Embeddings,
    GenerateRequest,
    GenerationRequest,
    Ranking,
    RerankRequest,
)
from gateway.observe import logs
from gateway.observe.requestlog import RequestRecord
from gateway.service.backend import Backend, Stream
from gateway.service.keys import ApiKeys
from gateway.service.local import LocalBackend
from gateway.service.responses import StoredResponse, StoredResponses

log = logging.getLogger("mlx_manager")
# (state, seconds elapsed, message): "loading" while it loads, then "ready".
Progress = Callable[[str, float, str], Awaitable[None]]
PROGRESS_INTERVAL = 0.5
# usage_stats' `by` choices (every face offers these) and the request log columns each groups by.
USAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "key": ("key_name",),
    "model,key": ("model", "key_name"),
    "total": (),
}


class Service:
    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        private_dir(settings.home)
        self.store = Store(settings.db_path)
        self.catalog = Catalog(settings, self.store)
        self.profiles = Profiles(self.catalog)
        self.keys = ApiKeys(self.store, settings)
        self.responses = StoredResponses(self.store, settings)
        self.backend: Backend = backend or LocalBackend(settings, self.store, self.catalog)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Start the backend; pinned models (MLX_MANAGER_PRELOAD, pinned profiles) load in
        the background."""
        pinned = [
            *self.settings.preload,
            *(p["name"] for p in self.store.profiles() if p["pinned"]),
        ]
        await self.backend.start(pinned)
        self._background(asyncio.to_thread(self._prune_responses))

    def _prune_responses(self) -> None:
        try:
            self.responses.prune()
        except Exception:  # a busy database must not stop the start; the next write prunes
            log.warning("could not prune stored responses", exc_info=True)

    async def close(self) -> None:
        # Let what was started (a pinned profile's load) finish: a CLI exits right after.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.close()

    def _background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Models ---------------------------------------------------------------------------------

    async def list_models(self) -> list[dict[str, Any]]:
        loaded = await self._loaded_paths()
        return [
            {
                "id": m.id,
                "family": m.family,
                "quantization_bits": m.quantization_bits,
                "context_length": m.context_length,
                "size_bytes": m.size_bytes,
                "loaded": str(m.path) in loaded,
                "kind": m.kind,
                "source": m.source,
                **({"description": m.description} if m.description else {}),
            }
            for m in self.catalog.models()
            if self.catalog.allowed(m.id)
        ]

    async def names(self) -> list[dict[str, Any]]:
        """Every name a request can use, each once: local models, then profile names and
        aliases (`profile` says which profile, `model` what it serves)."""
        loaded = await self._loaded_paths()
        entries = [
            _model_entry(m.id, m, loaded)
            for m in self.catalog.models()
            if self.catalog.allowed(m.id)
        ]
        for name, p, model in self.catalog.profile_names():
            entries.append(
                {
                    "id": name,
                    "profile": p["name"],
                    "model": p["model"],
                    "loaded": model is not None and str(model.path) in loaded,
                    "kind": model.kind if model is not None else None,
                }
            )
        return entries

    async def name(self, name: str) -> dict[str, Any]:
        """What one name stands for, as names() lists it; an absolute path, which is usable
        but not listed, as its model. Unknown names are 404 with close matches."""
        resolved = self.catalog.resolve(name)  # the allow-list and shadowing, as names()
        loaded = await self._loaded_paths()
        profile = resolved.profile
        if profile is not None:
            model = resolved.model
            return {
                "id": name,
                "profile": profile["name"],
                "model": profile["model"],
                "loaded": str(model.path) in loaded,
                "kind": model.kind,
            }
        return _model_entry(name, resolved.model, loaded)

    async def model_info(self, name: str) -> dict[str, Any]:
        resolved = self.catalog.resolve(name)
        info = inspect_model(resolved.model)
        status = await self.backend.workers()  # once: from a server, each look is a request
        info["loaded"] = str(resolved.model.path) in _loaded(status)
        memory = _memory(status)
        info["estimated_memory_bytes"] = _estimate(resolved.model.weights_bytes, memory)
        info["fits_memory_budget"] = info["estimated_memory_bytes"] <= memory["budget_bytes"]
        if resolved.profile is not None:
            info["profile"] = resolved.profile["name"]
        return info

    async def _loaded_paths(self) -> set[str]:
        return _loaded(await self.backend.workers())

    # Hub --------------------------------------------------------------------------------------

    async def search_models(
        self, query: str | None, author: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        author = author or self.settings.hf_organization or None
        results = await asyncio.to_thread(search, query, author, limit)
        local = {m.id for m in self.catalog.models()}
        memory = await self.memory()
        for r in results:
            r["downloaded"] = r["id"] in local
            size = r["size_bytes"]
            fits = None if size is None else _estimate(size, memory) <= memory["budget_bytes"]
            r["fits_memory_budget"] = fits
        return results

    async def download_model(
        self, repo: str, progress: DownloadProgress | None = None, wait: bool = True
    ) -> dict[str, Any]:
        with _storage():
            job = await self.backend.start_download(repo)
        if not wait:
            return job
        result = await self.backend.wait_download(job, progress)
        if result["status"] == "done":
            self.catalog.refresh()
        return result

    async def download_status(self, job_id: str | None = None) -> Any:
        """One download's status, or every download's."""
        if job_id:
            return await self.backend.download(job_id)
        return await self.backend.downloads()

    async def cancel_download(self, job_id: str) -> dict[str, Any]:
        return await self.backend.cancel_download(job_id)

    async def delete_model(self, name: str, unload: bool = False) -> dict[str, Any]:
        """Remove a model from the HF cache (all revisions). A loaded model is refused unless
        `unload` asks to unload it first."""
        resolved = self.catalog.resolve(name)
        model = resolved.model
        if model.source != "hf-cache":
            raise errors.InvalidRequest(
                f"'{model.id}' is not in the Hugging Face cache (it is "
                f"in {model.path}); delete that folder yourself.",
                param="model",
            )
        if str(model.path) in await self._loaded_paths():
            if not unload:
                raise errors.Conflict(
                    f"'{model.id}' is loaded; unload it first (or pass unload=true).", param="model"
                )
            await self.unload(model.id)
        freed = await asyncio.to_thread(delete_from_cache, self.settings.hf_cache, model.id)
        self.catalog.refresh()
        return {"model": model.id, "deleted": True, "freed_bytes": freed}

    # Profiles (the database is shared: local in every mode) ---------------------------------

    async def list_profiles(self) -> list[dict[str, Any]]:
        return self.profiles.list()

    async def get_profile(self, name: str) -> dict[str, Any]:
        return self.profiles.get(name)

    async def create_profile(self, data: dict[str, Any]) -> dict[str, Any]:
        with _storage():
            profile = self.profiles.create(data)
        if profile["pinned"]:
            self._background(self._load_quietly(profile["name"]))
        return profile

    async def update_profile(
        self, name: str, changes: dict[str, Any], clear: list[str] | None = None
    ) -> dict[str, Any]:
        with _storage():
            profile = self.profiles.update(name, changes, clear or [])
        if changes.get("pinned"):
            self._background(self._load_quietly(name))
        return profile

    async def delete_profile(self, name: str) -> dict[str, Any]:
        with _storage():
            return self.profiles.delete(name)

    async def _load_quietly(self, name: str) -> None:
        """A pinned profile loads now; a failure shows in list_loaded, not here."""
        try:
            await self.load(name)
        except errors.ServiceError:
            pass

    # API keys (local only: whoever can write the database can manage keys) -----------------

    async def create_key(self, name: str) -> dict[str, Any]:
        with _storage():
            return self.keys.create(name)

    async def list_keys(self) -> list[dict[str, Any]]:
        return self.keys.list()

    async def revoke_key(self, name: str) -> dict[str, Any]:
        with _storage():
            return self.keys.revoke(name)

    # Requests: what was asked, and how it went ----------------------------------------------

    def finish_request(self, record: RequestRecord) -> None:
        """A request is over: its log line, request log row and metrics, by whoever served
        it (synchronous: called as the last byte goes out)."""
        self.backend.finish(record)

    async def metrics(self) -> str:
        """Prometheus' text exposition of the metrics of whoever serves the requests."""
        return await self.backend.metrics()

    @property
    def request_log_enabled(self) -> bool:
        return self.settings.request_log_limits != (0.0, 0)

    async def requests_log(
        self,
        model: str | None = None,
        key: str | None = None,
        status: int | None = None,
        errors_only: bool = False,
        since: str | None = None,
        limit: int = 50,
        after_id: int | None = None,
        endpoint: str | None = None,
    ) -> list[dict[str, Any]]:
        """Request log rows, newest first (after `after_id`: oldest first, for following).
        `model` matches the model or the profile a request named."""
        if not 1 <= limit <= 10_000:
            raise errors.InvalidRequest("limit must be from 1 to 10000.", param="limit")
        await self.backend.flush_requests()
        return self.store.requests(
            model=model,
            key_name=key,
            endpoint=endpoint,
            status=status,
            errors=errors_only,
            since=_since(since),
            after_id=after_id,
            limit=limit,
            content=self.settings.log_content,
        )

    async def usage_stats(self, since: str | None = "24h", by: str = "model") -> dict[str, Any]:
        """Requests, errors, tokens, latency and decode speed from the request log, per model,
        per API key or both, over a window (`since`: "1h", "7d", or an ISO time)."""
        if by not in USAGE_GROUPS:
            raise errors.InvalidRequest(
                f"by must be one of {', '.join(USAGE_GROUPS)}, not {by!r}.",
                param="by",
            )
        await self.backend.flush_requests()
        start = _since(since or "24h")
        rows = self.store.usage(start, USAGE_GROUPS[by])
        (total,) = self.store.usage(start, ())
        return {
            "since": start,
            "until": timestamp(time.time()),
            "by": by,
            "rows": rows if by != "total" else [],
            "total": total,
        }

    async def worker_logs(self, name: str, lines: int = 100) -> dict[str, Any]:
        """The end of a model's worker log: its loads, errors, and the traceback of a crash.
        Kept across restarts and unloads, so a model that is gone can still be looked at."""
        if not 1 <= lines <= 10_000:
            raise errors.InvalidRequest("lines must be from 1 to 10000.", param="lines")
        try:
            model_id = self.catalog.resolve(name).model.id
        except errors.ModelNotFound:
            model_id = name  # deleted since, but its log may remain
        path = logs.worker_log_path(self.settings.logs_dir, model_id)
        if not any(path.parent.glob(path.name + "*")):
            raise errors.NotFound(
                f"No worker log for '{name}': it has not been loaded on this server "
                f"(logs live in {path.parent}).",
                param="model",
            )
        return {"model": model_id, "file": str(path), "lines": logs.tail(path, lines)}

    # Workers --------------------------------------------------------------------------------

    async def workers(self) -> dict[str, Any]:
        """Every model with a worker (or requests waiting for one), and the memory budget."""
        return await self.backend.workers()

    async def list_loaded(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = (await self.backend.workers())["data"]
        return data

    async def memory(self) -> dict[str, Any]:
        """The budget, what loaded models use of it, and the factor that estimates a model's
        memory from its weights (measured on the models loaded so far)."""
        return _memory(await self.backend.workers())

    async def load(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        return await _with_progress(self.backend.load(name), name, progress)

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        return await self.backend.unload(name, force=force)

    # Generation -------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, record: RequestRecord) -> Stream:
        """The one generation path of every face: resolve the name, apply the profile and the
        limits, wait for a worker and start. The stream yields typed events (engine/protocol.py)
        and then its usage; `record` is filled once, by whoever serves it."""
        return await self.backend.generate(request, record)

    async def count_tokens(self, request: GenerateRequest, record: RequestRecord) -> int:
        """The prompt tokens that generating `request` would report (its first choice), counted
        by the model's own worker and template: nothing is generated."""
        first = replace(request.choices[0], count_only=True, max_tokens=None)
        counted = replace(request, choices=[first], n=1, stream=False)
        stream = await self.generate(counted, record)
        await stream.collect()
        return stream.usage.prompt_tokens

    async def embed(self, request: EmbeddingRequest, record: RequestRecord) -> Embeddings:
        """The one embedding path of every face: resolve the name, apply the profile and the
        limits, and have the model's worker compute one vector per input, through the same
        pool as generation (budget, LRU, TTL, queue). `record` gets the prompt tokens."""
        return await self.backend.embed(request, record)

    async def rerank(self, request: RerankRequest, record: RequestRecord) -> Ranking:
        """The one rerank path: each document's relevance to the query (0-1, in the order
        given), from a reranker model's worker through the same pool."""
        return await self.backend.rerank(request, record)

    # Stored responses (/v1/responses with `store: true`) --------------------------------------

    async def save_response(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], key_name: str | None
    ) -> None:
        """Keep a response and the input items of its whole conversation for later requests
        (`previous_response_id`), readable by the key that made it."""
        with _storage():
            await asyncio.to_thread(self.responses.save, response, input_items, key_name)

    async def stored_response(
        self, response_id: str, key_name: str | None, param: str | None = None
    ) -> StoredResponse:
        """A stored response; 404 (naming `param`) when unknown, expired or another key's."""
        return await asyncio.to_thread(self.responses.get, response_id, key_name, param)

    async def delete_response(self, response_id: str, key_name: str | None) -> None:
        with _storage():
            await asyncio.to_thread(self.responses.delete, response_id, key_name)

    async def response_input_items(
        self,
        response_id: str,
        key_name: str | None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of a stored response's input items, and whether more follow."""
        return await asyncio.to_thread(
            self.responses.input_items, response_id, key_name, limit, order, after
        )

    async def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        temperature: float | None = None,
        max_tokens: int | None = None,
        key_name: str | None = None,
    ) -> dict[str, Any]:
        """One chat turn (MCP's `chat`), recorded like a /v1 request as endpoint `mcp:chat`."""
        record = RequestRecord("mcp:chat", key_name=key_name, model=name)
        choice = GenerationRequest(
            kind="chat", messages=messages, temperature=temperature, max_tokens=max_tokens
        )
        complete = False
        try:
            stream = await self.generate(
                GenerateRequest(model=name, choices=[choice], content=lambda: messages), record
            )
            (answer,) = await stream.collect()
            complete = True
        except errors.ServiceError as e:
            record.failed(e.status, e.message)
            raise
        finally:
            record.end(200, complete)
            self.finish_request(record)
        usage = stream.usage
        return {
            "model": name,
            "content": answer.text,
            "reasoning": answer.reasoning or None,
            "tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in answer.tool_calls],
            "finish_reason": answer.finish_reason,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "cached_tokens": usage.cached_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
            },
        }

    async def system_info(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        status = await self.backend.workers()
        memory = _memory(status)
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        return {
            "os": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": vm.total,
            "memory_available_bytes": vm.available,
            "mlx_version": _version("mlx"),
            "mlx_lm_version": _version("mlx-lm"),
            # The gateway does not import MLX itself; the backend follows from the platform
            # (the same marker that picks mlx[cpu] at install time).
            "mlx_backend": "metal (gpu)" if apple else "cpu",
            "memory_budget": {k: v for k, v in memory.items() if k != "estimate_factor"},
            "loaded_models": sum(s["state"] == "ready" for s in status["data"]),
        }


@contextmanager
def _storage() -> Iterator[None]:
    """A full disk under the database is the service's own error (507, naming the folder), for
    every face to render, rather than an sqlite error that becomes a 500."""
    try:
        yield
    except DatabaseFull as e:
        raise errors.DiskFull(str(e)) from None


def _model_entry(name: str, model: LocalModel, loaded: set[str]) -> dict[str, Any]:
    """A model as names() lists it; named by an absolute path (usable, not listed), without
    its size and description."""
    entry: dict[str, Any] = {
        "id": name,
        "created": model.created,
        "loaded": str(model.path) in loaded,
        "context_length": model.context_length,
        "kind": model.kind,  # chat, embedding or reranker
    }
    if name == model.id:
        entry |= {"size_bytes": model.size_bytes, "description": model.description}
    return entry


def _loaded(status: dict[str, Any]) -> set[str]:
    """The folders of the models that are ready, from the backend's workers status."""
    return {s["path"] for s in status["data"] if s["state"] == "ready"}


def _memory(status: dict[str, Any]) -> dict[str, Any]:
    """The budget, what loaded models use of it, and the factor that estimates a model's
    memory from its weights, from the backend's workers status."""
    return {
        "budget_bytes": status["memory_budget_bytes"],
        "used_bytes": status["memory_used_bytes"],
        "estimate_factor": status["memory_estimate_factor"],
    }


def _estimate(weights_bytes: int, memory: dict[str, Any]) -> int:
    """Memory a model of these weights would take, by the owner's measured factor."""
    return int(weights_bytes * memory["estimate_factor"])


def _since(text: str | None) -> str | None:
    """A window's start in the request log's time format, from "90m", "24h", "7d" or an
    ISO 8601 time."""
    if text is None or not str(text).strip():
        return None
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = None
    if seconds is not None and seconds >= 0:
        return timestamp(time.time() - seconds)
    try:
        when = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        raise errors.InvalidRequest(
            f"since {text!r}: give a duration back from now ('90m', '24h', '7d') or an ISO "
            "8601 time ('2026-11-29T06:00:00Z').",
            param="since",
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without a zone is local time
    return timestamp(when.timestamp())


async def _with_progress(
    work: Awaitable[dict[str, Any]], name: str, progress: Progress | None
) -> dict[str, Any]:
    """Await a load, reporting elapsed time every half second while it runs."""
    if progress is None:
        return await work
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    await progress("loading", 0.0, f"loading {name}")
    while True:
        done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
        elapsed = time.monotonic() - started
        if done:
            result = task.result()
            await progress("ready", elapsed, f"{name} is ready ({elapsed:.1f}s)")
            return result
        await progress("loading", elapsed, f"loading {name} ({elapsed:.1f}s)")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
