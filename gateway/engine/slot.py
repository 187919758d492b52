"""A model's place in the pool (`Slot`), what the pool needs of its worker (`Worker`, made by a
`WorkerFactory`), and the memory a model is expected to take before it reports its own."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.catalog.local import LocalModel
from gateway.engine.handle import Sink

DRAINED = "drained"


class Worker(Protocol):
    """What the pool needs of a worker: gateway/engine/handle.py's WorkerHandle, or a test's fake.

    Its state goes loading -> ready -> stopped, or failed. Events of each submitted request go
    to its sink as gateway/engine/protocol.py's events, ending with Finished or Failed. When it dies
    or hangs on its own (not when stopped), it fails what it runs with ModelUnavailable, sets
    `state` "failed" (and `stalled` for a hang) and calls the on_exit its factory was given
    (while loading too: start() then raises).
    """

    state: str
    # Once loaded: memory_bytes (kept current while it runs), context_length, load_seconds.
    info: dict[str, Any]
    error: str | None  # why it failed
    stalled: bool  # it failed because it stopped answering
    worker_active: int  # sequences it reports running
    generated_tokens: int
    tokens_per_second: float

    @property
    def pid(self) -> int | None: ...

    @property
    def silent_seconds(self) -> float: ...

    async def start(self, timeout: float) -> None:
        """Load the model; ModelUnavailable if that fails or takes longer than `timeout`."""

    def submit(self, req: dict[str, Any], sink: Sink) -> str:
        """Queue one request, returning its id; ModelUnavailable unless ready."""
        raise NotImplementedError

    def embed(self, req: dict[str, Any], sink: Sink) -> str:
        """Queue one embedding request (its one answer: Embedded or Failed)."""
        raise NotImplementedError

    def cancel(self, rid: str) -> None:
        """Stop a request: no more of its events reach its sink."""

    async def stop(self, reason: str) -> None:
        """End the worker, returning once it has gone; what still runs fails with `reason`."""


# (model, options for the worker process, on_exit) -> a worker that has not started yet.
WorkerFactory = Callable[[LocalModel, dict[str, Any], Callable[[Worker], None]], Worker]


class MemoryEstimate:
    """Memory a model needs before its worker has reported a real figure: its weights times a
    factor. The factor starts at 1.2 (headroom for KV caches and MLX's buffer cache), then is
    measured: the highest ratio of a loaded worker's real figure to its weights seen so far,
    kept within [1.0, 3.0]. A model's own figure replaces the estimate once it has loaded."""

    DEFAULT, LOW, HIGH = 1.2, 1.0, 3.0

    def __init__(self) -> None:
        self.factor = self.DEFAULT
        self.measured = False

    def observe(self, weights_bytes: int, real_bytes: int) -> None:
        if weights_bytes <= 0 or real_bytes <= 0:
            return
        ratio = min(self.HIGH, max(self.LOW, real_bytes / weights_bytes))
        self.factor = max(self.factor, ratio) if self.measured else ratio
        self.measured = True

    def __call__(self, weights_bytes: int) -> int:
        return int(weights_bytes * self.factor)


LOADED_STATES = ("loading", "ready", "draining")


@dataclass(eq=False)
class Slot:
    """One model's place in the pool."""

    key: str
    model: LocalModel
    state: str = "unloaded"  # unloaded | loading | ready | draining | failed
    handle: Worker | None = None
    active: int = 0  # leases: requests running on the worker
    waiters: deque[asyncio.Future[Worker]] = field(default_factory=deque)
    load_task: asyncio.Task[None] | None = None
    unload_task: asyncio.Task[None] | None = None
    pinned: bool = False
    ttl: float | None = None  # profile TTL; None: the pool's default
    keep_alive: float | None = None  # the last request's keep_alive (None: it gave none)
    drain_reason: str = DRAINED  # why it stops once its running requests end
    measured: int | None = None  # memory the worker reported last time it was loaded
    last_used: float = field(default_factory=time.time)
    loaded_at: float | None = None
    ttl_timer: asyncio.TimerHandle | None = None
    served: int = 0
    loads: int = 0
    crashes: int = 0
    stalls: int = 0  # times its worker stopped answering and was killed
    error: str | None = None
    estimator: MemoryEstimate = field(default_factory=MemoryEstimate, repr=False)

    @property
    def estimate(self) -> int:
        if self.measured:
            return self.measured
        return self.estimator(self.model.weights_bytes)

    @property
    def memory(self) -> int:
        """What this slot counts against the budget now."""
        if self.state not in LOADED_STATES:
            return 0
        real = self.handle.info.get("memory_bytes") if self.handle else None
        return max(real or 0, self.estimate if self.state == "loading" else 0) or self.estimate

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self.waiters

    def status(self, ttl: float | None, queued: int) -> dict[str, Any]:
        """This model's row in /admin/workers, `ps` and the metrics; `ttl` is its idle TTL
        (None: forever), `queued` the requests waiting for it."""
        now = time.time()
        handle = self.handle
        ttl_left = None
        if self.state == "ready" and self.idle and ttl is not None:
            ttl_left = round(max(0.0, self.last_used + ttl - now), 3)
        return {
            "model": self.model.id,
            "path": str(self.model.path),
            "state": self.state,
            "pid": handle.pid if handle else None,
            "pinned": self.pinned,
            "memory_bytes": self.memory,
            "estimated_bytes": self.estimate,
            "uptime_seconds": round(now - self.loaded_at, 3) if self.loaded_at else None,
            "idle_seconds": round(now - self.last_used, 3) if self.active == 0 else 0.0,
            "ttl_seconds": ttl,
            "ttl_remaining_seconds": ttl_left,
            "in_flight": self.active,
            "queued": queued,
            "requests_served": self.served,
            "loads": self.loads,
            "crashes": self.crashes,
            "stalls": self.stalls,
            # Seconds since the worker last spoke (its heartbeat comes every second).
            "silent_seconds": round(handle.silent_seconds, 3) if handle else None,
            "worker_active": handle.worker_active if handle else 0,
            "generated_tokens": handle.generated_tokens if handle else 0,
            "tokens_per_second": round(handle.tokens_per_second, 1) if handle else 0.0,
            "context_length": handle.info.get("context_length") if handle else None,
            "error": self.error,
        }
