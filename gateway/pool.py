"""The ModelPool: the only owner of worker lifecycle.

Resolves a request's model name, loads each model once however many requests ask for it at the
same time (single flight), reaps workers that die so the next request starts a fresh one, and
hands requests to workers as `Generation` streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from config.settings import Settings
from gateway import errors
from gateway.catalog import Catalog, Resolved
from gateway.generation import Choice, GenerationRequest
from gateway.handle import WorkerHandle

log = logging.getLogger("mlx_manager.pool")


class Generation:
    """The choices of one API request, streaming from one worker.

    Iterating yields ("d", index, text, logprob) and ("f", index, finish_reason, tokens);
    a worker failure mid-stream raises the matching ServiceError.
    """

    def __init__(self, handle: WorkerHandle, resolved: Resolved, requests: list[GenerationRequest]):
        self.handle = handle
        self.resolved = resolved
        self.requests = requests
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.prompt_tokens = [0] * len(requests)
        self._index: dict[str, int] = {}
        self._early: list[tuple[Any, ...]] = []
        self._open: set[str] = set()

    async def start(self) -> None:
        """Submit every choice and wait until the worker accepted all prompts, so that a bad
        prompt still gets a plain HTTP error before any streaming starts."""
        for i, req in enumerate(self.requests):
            rid = self.handle.submit(req.payload(), self.queue.put_nowait)
            self._index[rid] = i
            self._open.add(rid)
        waiting = set(self._open)
        while waiting:
            ev = await self.queue.get()
            if ev[0] == "s":
                self.prompt_tokens[self._index[ev[1]]] = ev[2]
                waiting.discard(ev[1])
            elif ev[0] == "e":
                self._open.discard(ev[1])
                self.close()
                raise _error(ev)
            else:
                self._early.append(ev)

    async def __aiter__(self) -> AsyncIterator[tuple[Any, ...]]:
        for ev in self._early:
            yield self._translate(ev)
        self._early.clear()
        while self._open:
            ev = await self.queue.get()
            if ev[0] == "e":
                self._open.discard(ev[1])
                self.close()
                raise _error(ev)
            yield self._translate(ev)

    def _translate(self, ev: tuple[Any, ...]) -> tuple[Any, ...]:
        if ev[0] == "f":
            self._open.discard(ev[1])
        return (ev[0], self._index[ev[1]], *ev[2:])

    def close(self) -> None:
        """Cancel whatever has not finished (the client went away, or another choice failed)."""
        for rid in self._open:
            self.handle.cancel(rid)
        self._open.clear()

    async def collect(self) -> list[Choice]:
        choices = [Choice(i) for i in range(len(self.requests))]
        parts: list[list[str]] = [[] for _ in choices]
        try:
            async for ev in self:
                c = choices[ev[1]]
                if ev[0] == "d":
                    parts[ev[1]].append(ev[2])
                    if ev[3] is not None:
                        c.logprobs.append(ev[3])
                else:
                    c.finish_reason, c.completion_tokens = ev[2], ev[3]
        finally:
            self.close()
        for c, p in zip(choices, parts, strict=True):
            c.text = "".join(p)
        return choices


def _error(ev: tuple[Any, ...]) -> errors.ServiceError:
    cls = getattr(errors, ev[2], errors.ServiceError)
    return cls(ev[3])


class ModelPool:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.workers: dict[str, WorkerHandle] = {}
        self._loads: dict[str, asyncio.Task[WorkerHandle]] = {}
        self.load_counts: dict[str, int] = {}  # loads started per model, ever

    def resolve(self, name: str) -> Resolved:
        return self.catalog.resolve(name)

    async def acquire(self, resolved: Resolved) -> WorkerHandle:
        """A ready worker for this model, loading it if needed: once, however many ask."""
        key = resolved.key
        handle = self.workers.get(key)
        if handle is not None and handle.state == "ready":
            return handle
        task = self._loads.get(key)
        if task is None:
            task = asyncio.create_task(self._load(resolved))
            self._loads[key] = task
            task.add_done_callback(lambda _t: self._loads.pop(key, None))
        # shield: one waiter going away (client disconnect) must not cancel everyone's load
        return await asyncio.shield(task)

    async def _load(self, resolved: Resolved) -> WorkerHandle:
        key = resolved.key
        old = self.workers.pop(key, None)
        if old is not None:
            await old.stop()
        handle = WorkerHandle(resolved.model, {"batch_size": self.settings.batch_size})
        self.load_counts[key] = self.load_counts.get(key, 0) + 1
        self.workers[key] = handle
        try:
            await handle.start(self.settings.load_timeout)
        except BaseException:
            if self.workers.get(key) is handle:
                del self.workers[key]
            await handle.stop()
            raise
        return handle

    async def generate(self, name: str, requests: list[GenerationRequest]) -> Generation:
        resolved = self.resolve(name)
        default_max = self.settings.default_max_tokens
        reqs = [r.with_defaults(resolved.profile, default_max) for r in requests]
        handle = await self.acquire(resolved)
        generation = Generation(handle, resolved, reqs)
        await generation.start()
        return generation

    def reap(self) -> None:
        """Forget workers that died, so the next request for their model starts a fresh one."""
        for key, handle in list(self.workers.items()):
            if handle.state in ("failed", "stopped") and key not in self._loads:
                del self.workers[key]

    def is_loaded(self, resolved: Resolved) -> bool:
        handle = self.workers.get(resolved.key)
        return handle is not None and handle.state == "ready"

    def status(self) -> list[dict[str, Any]]:
        self.reap()
        return [{**h.status(), "loads": self.load_counts[k]} for k, h in self.workers.items()]

    async def close(self) -> None:
        for task in list(self._loads.values()):
            task.cancel()
        handles, self.workers = list(self.workers.values()), {}
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)
