"""One generation request streaming from one worker: its choices' events, with the choice's
index in place of the request id, and its usage, kept as the events pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from gateway import errors
from gateway.engine.protocol import (
    Embedded,
    Event,
    Failed,
    Finished,
    Output,
    Reasoning,
    Started,
    Text,
    ToolCallArgs,
    ToolCallStart,
)
from gateway.engine.request import Choice, GenerationRequest
from gateway.observe.usage import Usage


class Worker(Protocol):
    """What a stream needs of its worker (the pool's Worker has more)."""

    def submit(self, req: dict[str, Any], sink: Callable[[Event], None]) -> str: ...

    def cancel(self, rid: str) -> None: ...


class Generation:
    """The choices of one request. Iterating yields their events (gateway/engine/protocol.py) with
    `seq` set to the choice's index; a worker failure mid-stream raises the matching
    ServiceError. `usage` is exact once the iteration ends; `on_close` hears it exactly once,
    whether the stream finished, failed or was abandoned."""

    def __init__(
        self,
        handle: Worker,
        release: Callable[[], None],
        requests: list[GenerationRequest],
        n: int = 1,
        on_close: Callable[[Generation], None] | None = None,
    ) -> None:
        self.handle = handle
        self._release = release  # gives the worker back to the pool (once: the pool's Lease)
        self.requests = requests
        self.n = n  # choices per prompt
        self.on_close = on_close
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.error: errors.ServiceError | None = None
        self.texts: list[list[str]] | None = None  # each choice's text, when the log keeps it
        self._prompt = [0] * len(requests)
        self._cached = [0] * len(requests)
        self._reasons: list[str | None] = [None] * len(requests)
        self._finished_tokens = 0  # completion tokens of finished choices
        self._reasoning_tokens = 0
        self._token_events = [0] * len(requests)  # token events seen, per unfinished choice
        self._first: float | None = None
        self.started = time.perf_counter()  # made once a worker was leased
        self.load_seconds = 0.0  # waited for that worker (its load): set by the pool
        self._index: dict[str, int] = {}
        self._early: list[Event] = []
        self._open: set[str] = set()
        self._closed = False

    async def start(self) -> None:
        """Submit every choice and wait until the worker accepted all prompts, so that a bad
        prompt still gets a plain error before any streaming starts."""
        try:
            for i, req in enumerate(self.requests):
                rid = self.handle.submit(req.payload(), self.queue.put_nowait)
                self._index[rid] = i
                self._open.add(rid)
            waiting = set(self._open)
            while waiting:
                ev = await self.queue.get()
                if isinstance(ev, Started):
                    i = self._index[ev.seq]
                    self._prompt[i], self._cached[i] = ev.prompt_tokens, ev.cached_tokens
                    waiting.discard(ev.seq)
                elif isinstance(ev, Failed):
                    self._open.discard(ev.seq)
                    raise self._failed(ev)
                else:
                    self._early.append(ev)
                    if self._first is None:
                        self._first = time.perf_counter()
        except BaseException:
            self.close()
            raise

    async def __aiter__(self) -> AsyncIterator[Output]:
        try:
            for ev in self._early:
                yield self._translate(ev)
            self._early.clear()
            while self._open:
                ev = await self.queue.get()
                if isinstance(ev, Failed):
                    self._open.discard(ev.seq)
                    raise self._failed(ev)
                yield self._translate(ev)
        finally:
            self.close()

    def _failed(self, ev: Failed) -> errors.ServiceError:
        cls = getattr(errors, ev.kind, errors.ServiceError)
        self.error = cls(ev.message)
        return self.error

    def _translate(self, ev: Event) -> Output:
        i = self._index[ev.seq]
        if self._first is None:
            self._first = time.perf_counter()
        if isinstance(ev, Finished):
            self._open.discard(ev.seq)
            self._reasons[i] = ev.reason
            self._finished_tokens += ev.completion_tokens
            self._reasoning_tokens += ev.reasoning_tokens
        else:
            self._token_events[i] += 1
            if self.texts is not None and isinstance(ev, Text):
                self.texts[i].append(ev.text)
        assert not isinstance(ev, Started | Failed | Embedded)
        return ev._replace(seq=i)

    @property
    def usage(self) -> Usage:
        """Exact for finished choices; a choice cut off (the client left) counts the token
        events it sent, which can be a few short of what the model made."""
        unfinished = sum(
            n for n, r in zip(self._token_events, self._reasons, strict=True) if r is None
        )
        return Usage(
            prompt_tokens=sum(self._prompt[:: self.n]),
            completion_tokens=self._finished_tokens + unfinished,
            cached_tokens=sum(self._cached[:: self.n]),
            reasoning_tokens=self._reasoning_tokens,
            first_token=self._first,
            started=self.started,
            load_seconds=self.load_seconds,
            finish_reasons=list(dict.fromkeys(r for r in self._reasons if r)),
        )

    def close(self) -> None:
        """Cancel whatever has not finished (the client went away, or another choice failed)
        and give the worker back. Safe to call more than once."""
        for rid in self._open:
            self.handle.cancel(rid)
        self._open.clear()
        self._release()
        if not self._closed:
            self._closed = True
            if self.on_close is not None:
                self.on_close(self)

    async def collect(self) -> list[Choice]:
        """Every choice whole (a non-streamed answer)."""
        choices = [Choice(i) for i in range(len(self.requests))]
        parts: list[list[str]] = [[] for _ in choices]
        async for ev in self:
            c = choices[ev.seq]
            if isinstance(ev, Text):
                parts[ev.seq].append(ev.text)
                if ev.logprob is not None:
                    c.logprobs.append(ev.logprob)
            elif isinstance(ev, Reasoning):
                c.reasoning += ev.text
            elif isinstance(ev, ToolCallStart):
                c.tool_calls.append([ev.call_id, ev.name, ""])
            elif isinstance(ev, ToolCallArgs):
                c.tool_calls[-1][2] += ev.text
            elif isinstance(ev, Finished):
                c.finish_reason, c.completion_tokens = ev.reason, ev.completion_tokens
                c.stop_sequence = ev.stop_sequence
        for c, p in zip(choices, parts, strict=True):
            c.text = "".join(p)
        return choices
