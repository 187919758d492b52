"""The service layer: every operation a person or an assistant can ask for, once. The HTTP admin
routes, the MCP tools and the CLI are thin adapters over a Manager.

`Manager` drives its own ModelPool (inside `mlx-manager serve`, or `mlx-manager mcp` when no
server runs); `RemoteManager` sends the operations that act on workers to a running server, so
that a stdio MCP client or the CLI sees and controls the same workers as everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
import psutil

from config.settings import Settings, parse_duration
from config.store import Store, timestamp
from gateway import errors, logs
from gateway.catalog import Catalog
from gateway.downloads import DownloadProgress, Downloads, delete_from_cache, search
from gateway.generation import GenerationRequest
from gateway.hub import inspect_model
from gateway.keys import ApiKeys, client_key
from gateway.metrics import Metrics
from gateway.pool import ModelPool
from gateway.profiles import Profiles
from gateway.requestlog import (
    CANCELLED,
    GENERATION_ENDPOINTS,
    RequestLog,
    RequestRecord,
    content_of,
)

# (state, seconds elapsed, message): "loading" while it loads, then "ready".
Progress = Callable[[str, float, str], Awaitable[None]]
PROGRESS_INTERVAL = 0.5
# Paths whose requests are logged at debug level only (probes and scrapes every few seconds).
QUIET_PATHS = frozenset({"/health", "/metrics"})
USAGE_GROUPS = {"model": ("model",), "key": ("key_name",), "model,key": ("model", "key_name")}
access_log = logging.getLogger(logs.ACCESS)


class Manager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.db_path)
        self.catalog = Catalog(settings, self.store)
        self.profiles = Profiles(self.catalog)
        self.metrics = Metrics()
        self.pool = ModelPool(settings, self.catalog, self.metrics)
        self.request_log = RequestLog(settings, self.store)
        self.downloads = Downloads(settings, self.store)
        self.keys = ApiKeys(self.store, settings)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Start the pool and load pinned models (MLX_MANAGER_PRELOAD, pinned profiles) in the
        background: the server answers at once, requests for them wait for their load."""
        self.pool.start()
        pinned = [
            *self.settings.preload,
            *(p["name"] for p in self.store.profiles() if p["pinned"]),
        ]
        self._background(self.pool.preload(pinned))
        self._background(self.downloads.resume_unfinished())
        self._background(asyncio.to_thread(self.request_log.prune))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pool.close()
        await asyncio.to_thread(self.request_log.close)

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
                "source": m.source,
                **({"description": m.description} if m.description else {}),
            }
            for m in self.catalog.models()
            if self.pool.allowed(m.id)
        ]

    async def model_info(self, name: str) -> dict[str, Any]:
        resolved = self.pool.resolve(name)
        info = inspect_model(resolved.model)
        info["loaded"] = str(resolved.model.path) in await self._loaded_paths()
        info["estimated_memory_bytes"] = self.pool.estimate(resolved.model.weights_bytes)
        budget = (await self.memory())["budget_bytes"]
        info["fits_memory_budget"] = info["estimated_memory_bytes"] <= budget
        if resolved.profile is not None:
            info["profile"] = resolved.profile["name"]
        return info

    async def _loaded_paths(self) -> set[str]:
        return {s["path"] for s in await self.list_loaded() if s["state"] == "ready"}

    # Hub --------------------------------------------------------------------------------------

    async def search_models(
        self, query: str | None, author: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        author = author or self.settings.hf_organization or None
        results = await asyncio.to_thread(search, query, author, limit)
        local = {m.id for m in self.catalog.models()}
        budget = (await self.memory())["budget_bytes"]
        for r in results:
            r["downloaded"] = r["id"] in local
            size = r["size_bytes"]
            r["fits_memory_budget"] = None if size is None else self.pool.estimate(size) <= budget
        return results

    async def download_model(
        self, repo: str, progress: DownloadProgress | None = None, wait: bool = True
    ) -> dict[str, Any]:
        job = await self.downloads.start(repo)
        if not wait:
            return job.status_dict()
        result = await self.downloads.wait(job, progress)
        if result["status"] == "done":
            self.catalog.refresh()
        return result

    def download_status(self, job_id: str | None = None) -> Any:
        return self.downloads.get(job_id).status_dict() if job_id else self.downloads.list()

    async def cancel_download(self, job_id: str) -> dict[str, Any]:
        return await self.downloads.cancel(job_id)

    async def delete_model(self, name: str, unload: bool = False) -> dict[str, Any]:
        """Remove a model from the HF cache (all revisions). A loaded model is refused unless
        `unload` asks to unload it first."""
        resolved = self.pool.resolve(name)
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

    def list_profiles(self) -> list[dict[str, Any]]:
        return self.profiles.list()

    def get_profile(self, name: str) -> dict[str, Any]:
        return self.profiles.get(name)

    async def create_profile(self, data: dict[str, Any]) -> dict[str, Any]:
        profile = self.profiles.create(data)
        if profile["pinned"]:
            self._background(self._load_quietly(profile["name"]))
        return profile

    async def update_profile(
        self, name: str, changes: dict[str, Any], clear: list[str] | None = None
    ) -> dict[str, Any]:
        profile = self.profiles.update(name, changes, clear or [])
        if changes.get("pinned"):
            self._background(self._load_quietly(name))
        return profile

    def delete_profile(self, name: str) -> dict[str, Any]:
        return self.profiles.delete(name)

    async def _load_quietly(self, name: str) -> None:
        """A pinned profile loads now; a failure shows in list_loaded, not here."""
        try:
            await self.load(name)
        except errors.ServiceError:
            pass

    # API keys (local only: whoever can write the database can manage keys) -----------------

    def create_key(self, name: str) -> dict[str, Any]:
        return self.keys.create(name)

    def list_keys(self) -> list[dict[str, Any]]:
        return self.keys.list()

    def revoke_key(self, name: str) -> dict[str, Any]:
        return self.keys.revoke(name)

    # Requests: what was asked, and how it went ----------------------------------------------

    def finish_request(self, record: RequestRecord) -> None:
        """A request is over: one line in the server log; for generation requests also a row
        in the request log and the metrics."""
        row = record.row()
        quiet = record.endpoint in QUIET_PATHS and (record.status or 0) < 400
        # An MCP client's GET /mcp stream (messages from the server) lasts until the client
        # closes it: that is its normal end, not a request that failed with 499.
        quiet = quiet or (
            record.method == "GET" and record.endpoint == "/mcp" and record.status == CANCELLED
        )
        level = logging.DEBUG if quiet else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(level, "request", extra={"fields": record.fields(row)})
        if record.endpoint in GENERATION_ENDPOINTS:
            self.metrics.request(record)
            self.request_log.add(row)

    def requests_log(
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
        self.request_log.flush()
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

    def usage_stats(self, since: str | None = "24h", by: str = "model") -> dict[str, Any]:
        """Requests, errors, tokens, latency and decode speed from the request log, per model,
        per API key or both, over a window (`since`: "1h", "7d", or an ISO time)."""
        if by not in USAGE_GROUPS and by != "total":
            raise errors.InvalidRequest(
                f"by must be one of {', '.join([*USAGE_GROUPS, 'total'])}, not {by!r}.",
                param="by",
            )
        self.request_log.flush()
        start = _since(since or "24h")
        rows = self.store.usage(start, USAGE_GROUPS.get(by, ()))
        (total,) = self.store.usage(start, ())
        return {
            "since": start,
            "until": timestamp(time.time()),
            "by": by,
            "rows": rows if by != "total" else [],
            "total": total,
        }

    def worker_logs(self, name: str, lines: int = 100) -> dict[str, Any]:
        """The end of a model's worker log: its loads, errors, and the traceback of a crash.
        Kept across restarts and unloads, so a model that is gone can still be looked at."""
        if not 1 <= lines <= 10_000:
            raise errors.InvalidRequest("lines must be from 1 to 10000.", param="lines")
        try:
            model_id = self.pool.resolve(name).model.id
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

    async def list_loaded(self) -> list[dict[str, Any]]:
        return self.pool.status()

    async def load(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        return await _with_progress(self.pool.load(name), name, progress)

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        return await self.pool.unload(name, force=force)

    async def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        temperature: float | None = None,
        max_tokens: int | None = None,
        key_name: str | None = None,
    ) -> dict[str, Any]:
        """One chat turn (MCP's `chat`), logged like a /v1 request as endpoint `mcp:chat`."""
        record = RequestRecord("mcp:chat", key_name=key_name, model=name)
        complete = False
        try:
            _check_messages(messages)
            request = GenerationRequest(
                kind="chat", messages=messages, temperature=temperature, max_tokens=max_tokens
            )
            resolved = self.pool.resolve(name)
            record.resolved(resolved)
            if self.settings.log_content:
                record.prompt = content_of(messages)
            gen = await self.pool.generate(resolved, [request])
            try:
                (choice,) = await gen.collect()
            finally:
                record.generated(gen)
            record.completion = choice.text if self.settings.log_content else None
            complete = True
        except errors.ServiceError as e:
            record.failed(e.status, e.message)
            raise
        finally:
            record.end(200, complete)
            self.finish_request(record)
        prompt = gen.prompt_tokens[0]
        return {
            "model": name,
            "content": choice.text,
            "finish_reason": choice.finish_reason,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": choice.completion_tokens,
                "total_tokens": prompt + choice.completion_tokens,
            },
        }

    async def memory(self) -> dict[str, int]:
        return {"budget_bytes": self.pool.budget, "used_bytes": self.pool.memory_used()}

    async def system_info(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
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
            "memory_budget": await self.memory(),
            "loaded_models": sum(s["state"] == "ready" for s in await self.list_loaded()),
        }


class RemoteManager(Manager):
    """Models and profiles from the shared files; workers through the running server."""

    def __init__(self, settings: Settings, base_url: str) -> None:
        super().__init__(settings)
        key = client_key(settings)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=base_url, timeout=None, headers=headers)

    async def start(self) -> None:
        pass  # the server owns the workers

    async def close(self) -> None:
        # Let requests already sent (a pinned profile's load) finish: a CLI exits right after.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = await self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise errors.ModelUnavailable(
                f"The mlx-manager server at {self.http.base_url} did not answer: {e}"
            ) from None
        if r.status_code >= 400:
            raise _remote_error(r)
        return r.json()

    async def list_loaded(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/admin/workers"))["data"]

    async def memory(self) -> dict[str, int]:
        status = await self._call("GET", "/admin/workers")
        return {
            "budget_bytes": status["memory_budget_bytes"],
            "used_bytes": status["memory_used_bytes"],
        }

    async def load(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        return await _with_progress(
            self._call("POST", "/admin/load", {"model": name}), name, progress
        )

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        return await self._call("POST", "/admin/unload", {"model": name, "force": force})

    async def download_model(
        self, repo: str, progress: DownloadProgress | None = None, wait: bool = True
    ) -> dict[str, Any]:
        """The server downloads (so its job list and resume cover it); this polls."""
        job = await self._call("POST", "/admin/downloads", {"model": repo})
        while wait and job["status"] in ("queued", "running"):
            if progress is not None:
                await progress(job)
            await asyncio.sleep(PROGRESS_INTERVAL)
            job = await self._call("GET", f"/admin/downloads/{job['id']}")
        if progress is not None:
            await progress(job)
        return job

    async def cancel_download(self, job_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/admin/downloads/{job_id}")

    async def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        temperature: float | None = None,
        max_tokens: int | None = None,
        key_name: str | None = None,
    ) -> dict[str, Any]:
        """Through the server's /v1, which logs it (under the local key's name)."""
        _check_messages(messages)
        body: dict[str, Any] = {"model": name, "messages": messages}
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        r = await self._call("POST", "/v1/chat/completions", body)
        choice = r["choices"][0]
        return {
            "model": name,
            "content": choice["message"]["content"],
            "finish_reason": choice["finish_reason"],
            "usage": r["usage"],
        }


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


def _check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise errors.InvalidRequest("messages must hold at least one message.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise errors.InvalidRequest(
                f"messages[{i}] needs a role of system, user or assistant.", param="messages"
            )
        if not isinstance(m.get("content"), str):
            raise errors.InvalidRequest(f"messages[{i}] needs a text content.", param="messages")


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


def _remote_error(r: httpx.Response) -> errors.ServiceError:
    try:
        err = r.json()["error"]
        message, param = err["message"], err.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = f"HTTP {r.status_code}: {r.text[:200]}", None
    for cls in (
        errors.InvalidRequest,
        errors.PermissionDenied,
        errors.NotFound,
        errors.Conflict,
        errors.TooManyRequests,
        errors.InsufficientMemory,
        errors.ModelUnavailable,
    ):
        if cls.status == r.status_code:
            return cls(message, param=param)
    return errors.ServiceError(message, param=param)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


async def running_server(settings: Settings) -> str | None:
    """The base URL of an mlx-manager server on the configured host and port, if one runs."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}"
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            r = await client.get(url + "/health")
        if r.status_code == 200 and r.json().get("service") == "mlx-manager":
            return url
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return None
