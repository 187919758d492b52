"""The ModelPool: the only owner of worker lifecycle.

Each model has a Slot whose state moves unloaded -> loading -> ready -> draining -> unloaded
(or failed, when a load fails or the worker dies; a failed slot loads again on the next request).
Requests hold a lease on a ready slot while they run. The pool:

- loads each model once, however many requests ask at the same time (single flight);
- admits one load at a time through the memory budget and the loaded-model count, evicting
  least-recently-used idle models first, and draining busy ones (they finish what they run, then
  stop) only when nothing idle is left; a model that cannot fit alone, or beside the pinned
  models, is refused before anything is evicted;
- queues requests that wait for a load or a drain, bounded per model, and grants them all at once
  when the model is ready, so a freshly loaded model serves its queue before it can be drained;
- unloads a model once it has been idle for its TTL (the timer starts when its last request ends);
- never evicts or expires pinned models;
- reaps workers that die: their requests fail with 503, the next request loads a fresh worker.

Workers come from a factory (by default real processes, handle.py's ProcessWorkers), and
the pool uses them only through the Worker protocol below: its scheduling is unit-tested with a
fake worker (tests/test_scheduler.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import psutil

from config.settings import Settings
from gateway import errors
from gateway.catalog.local import LocalModel
from gateway.catalog.names import Catalog, Resolved
from gateway.engine.handle import ProcessWorkers
from gateway.engine.protocol import Embedded, Event, Failed
from gateway.engine.request import Embeddings, GenerationRequest
from gateway.engine.slot import (
    DRAINED,
    LOADED_STATES,
    MemoryEstimate,
    Slot,
    Worker,
    WorkerFactory,
)
from gateway.engine.stream import Generation
from gateway.observe.logs import worker_log_path
from gateway.observe.metrics import Metrics
from gateway.units import format_bytes

log = logging.getLogger("mlx_manager.pool")

# Idle TTLs beyond a year mean "keep it loaded": event-loop timers cannot hold any float.
FOREVER = 365 * 86400.0
# Why a worker is stopped (its log and the metrics tell evictions from the rest).
EVICTED = "evicted to make room"
IDLE = "idle for"


class Lease:
    """A request's hold on a ready worker; released exactly once."""

    def __init__(self, pool: ModelPool, slot: Slot, handle: Worker) -> None:
        self.pool, self.slot, self.handle = pool, slot, handle
        self._released = False

    def release(self, served: bool = True) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self.slot, served)


class LoadAbandoned(Exception):
    """Nobody waits for this load any more."""


class ModelPool:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        metrics: Metrics | None = None,
        workers: WorkerFactory | None = None,
    ):
        """`workers` makes each model's worker; None: real processes (with the warm spare)."""
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.snapshot)
        self.slots: dict[str, Slot] = {}
        self.budget = settings.memory_budget_bytes(psutil.virtual_memory().total)
        self.default_ttl = settings.idle_ttl or None  # 0 disables the idle TTL
        self.estimate = MemoryEstimate()
        self._admit = asyncio.Lock()  # one load at a time passes the budget check
        self._changed: asyncio.Future[None] | None = None
        self._closing = False
        # The default factory, kept to start and stop its warm spare; None with a given one.
        self.processes: ProcessWorkers | None = None
        if workers is None:
            workers = self.processes = ProcessWorkers(settings)
        self.workers: WorkerFactory = workers

    def start(self) -> None:
        if self.processes is not None:
            self.processes.start()

    def spare_status(self) -> dict[str, Any] | None:
        spare = self.processes.spare if self.processes is not None else None
        return spare.status() if spare is not None else None

    # Names ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> Resolved:
        """Name -> model (and profile), enforcing the allow-list (the catalogue owns both): a
        forbidden model is 403 and loads nothing, whatever name or path reached it."""
        return self.catalog.resolve(name)

    def allowed(self, model_id: str) -> bool:
        return self.catalog.allowed(model_id)

    def _slot(self, resolved: Resolved) -> Slot:
        slot = self.slots.get(resolved.key)
        if slot is None:
            slot = self.slots[resolved.key] = Slot(
                resolved.key, resolved.model, estimator=self.estimate
            )
        elif slot.state not in LOADED_STATES:
            slot.model = resolved.model  # the files may have changed since it was last loaded
        profile = resolved.profile or {}
        if profile.get("pinned"):
            slot.pinned = True
        if profile.get("ttl") is not None:
            slot.ttl = float(profile["ttl"]) or None  # a profile TTL of 0 means forever
        return slot

    # Requests -------------------------------------------------------------------------------

    def _worker_options(self, model: LocalModel) -> dict[str, Any]:
        return {
            "batch_size": self.settings.batch_size,
            "prompt_cache_bytes": self.settings.prompt_cache_limit_bytes,
            "log_file": str(worker_log_path(self.settings.logs_dir, model.id)),
            # Several beats fit in the stall timeout, so one late beat is never a stall.
            "heartbeat_seconds": min(1.0, (self.settings.worker_stall_timeout or 4.0) / 4),
        }

    async def generate(
        self,
        resolved: Resolved,
        requests: list[GenerationRequest],
        keep_alive: float | None = None,
        n: int = 1,
        on_close: Callable[[Generation], None] | None = None,
    ) -> Generation:
        """Start generating `requests` (complete: defaults and limits applied by the service)
        on the model's worker, loading it first if need be."""
        asked = time.perf_counter()
        lease = await self.acquire(resolved, keep_alive)
        generation = Generation(lease.handle, lease.release, requests, n, on_close)
        generation.load_seconds = generation.started - asked
        await generation.start()
        return generation

    async def embed(
        self, resolved: Resolved, payload: dict[str, Any], keep_alive: float | None = None
    ) -> Embeddings:
        """Embeddings from the model's worker (loading it first if need be): a lease like a
        generation's, held until the one answer comes."""
        asked = time.perf_counter()
        lease = await self.acquire(resolved, keep_alive)
        waited = time.perf_counter() - asked  # for its load, if it was not ready
        try:
            answer: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

            def sink(ev: Event) -> None:
                if not answer.done():
                    answer.set_result(ev)

            rid = lease.handle.embed(payload, sink)
            try:
                ev = await answer
            except asyncio.CancelledError:
                lease.handle.cancel(rid)  # the client left: drop the answer when it comes
                raise
        finally:
            lease.release()
        if isinstance(ev, Failed):
            raise getattr(errors, ev.kind, errors.ServiceError)(ev.message)
        assert isinstance(ev, Embedded)
        return Embeddings(ev.vectors, ev.dim, ev.tokens, waited)

    async def acquire(self, resolved: Resolved, keep_alive: float | None = None) -> Lease:
        """A lease on a ready worker for this model: at once if it is ready, else after it
        loads (once, however many wait). Cancelling the wait leaves the queue."""
        if self._closing:
            raise errors.ModelUnavailable("The server is shutting down.")
        slot = self._slot(resolved)
        # Each request says how long the model stays after it, as in Ollama: one that gives no
        # keep_alive goes back to the default, so a keep_alive of 0 does not stick to the model
        # (it would unload after every later request, its prompt cache with it).
        slot.keep_alive = keep_alive
        queued = self.queue_depth(slot)
        if queued >= self.settings.max_queue:
            raise errors.TooManyRequests(
                f"Model '{slot.model.id}' has {queued} requests waiting (the limit is "
                f"{self.settings.max_queue}, MLX_MANAGER_MAX_QUEUE). Retry shortly."
            )
        if slot.state == "ready":
            return self._lease(slot)
        waiter: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        slot.waiters.append(waiter)
        self._ensure_loading(slot)
        try:
            handle = await waiter
        except asyncio.CancelledError:
            if waiter in slot.waiters:
                slot.waiters.remove(waiter)
                self._notify()  # a load waiting for room may now have nobody to load for
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(slot, served=False)  # granted in the instant the client left
            raise
        return Lease(self, slot, handle)

    def queue_depth(self, slot: Slot) -> int:
        """Requests waiting: for a load or a drain, or inside the worker beyond its batch."""
        return len(slot.waiters) + max(0, slot.active - self.settings.batch_size)

    def _lease(self, slot: Slot) -> Lease:
        assert slot.handle is not None
        self._cancel_ttl(slot)
        slot.active += 1
        slot.last_used = time.time()
        return Lease(self, slot, slot.handle)

    def _release(self, slot: Slot, served: bool = True) -> None:
        slot.active -= 1
        slot.served += served
        slot.last_used = time.time()
        if slot.active == 0:
            if slot.state == "draining":
                self._start_unload(slot, slot.drain_reason)
            elif slot.state == "ready" and not slot.waiters:
                self._schedule_ttl(slot)
        self._notify()

    # Loading --------------------------------------------------------------------------------

    def _ensure_loading(self, slot: Slot) -> None:
        if slot.load_task is None and slot.state in ("unloaded", "failed"):
            slot.load_task = asyncio.create_task(self._load(slot))

    async def _load(self, slot: Slot) -> None:
        try:
            async with self._admit:
                await self._make_room(slot)
                slot.state, slot.error = "loading", None
                slot.loads += 1
                handle = self.workers(
                    slot.model, self._worker_options(slot.model), self._on_worker_exit
                )
                slot.handle = handle
            started = time.perf_counter()
            await handle.start(self.settings.load_timeout)
        except LoadAbandoned:
            slot.state = "unloaded"
            self._notify()
            return
        except BaseException as e:
            failed = slot.handle
            slot.state, slot.handle = "failed", None
            slot.error = e.message if isinstance(e, errors.ServiceError) else repr(e)
            err = (
                e
                if isinstance(e, errors.ServiceError)
                else errors.ModelUnavailable(
                    f"Model '{slot.model.id}' could not be loaded: {slot.error}"
                )
            )
            self.metrics.load_failures.labels(slot.model.id).inc()
            if failed is not None and failed.stalled:
                slot.stalls += 1
                self.metrics.stalls.labels(slot.model.id).inc()
            self._fail_waiters(slot, err)
            if failed is not None:
                await failed.stop("its load failed")
            self._notify()
            if not isinstance(e, Exception):
                raise
            return
        finally:
            slot.load_task = None
            if slot.state in ("failed", "unloaded") and slot.waiters and not self._closing:
                # Requests that came while a failed load was being cleaned up (its worker
                # stopping) were not part of it: they get a load of their own.
                self._ensure_loading(slot)
        slot.state, slot.loaded_at = "ready", time.time()
        self.metrics.loads.labels(slot.model.id).inc()
        self.metrics.load_duration.labels(slot.model.id).observe(time.perf_counter() - started)
        slot.measured = handle.info.get("memory_bytes") or slot.measured
        if slot.measured:
            self.estimate.observe(slot.model.weights_bytes, slot.measured)
        log.info(
            "%s ready: %s, %.2fs",
            slot.model.id,
            format_bytes(slot.memory),
            handle.info.get("load_seconds", 0),
        )
        self._grant(slot)
        self._notify()

    def _grant(self, slot: Slot) -> None:
        """Lease the slot's ready worker to every request waiting for it, in one step: a model
        serves its queue before any other load can drain it. Idle, it starts its TTL."""
        assert slot.handle is not None
        while slot.waiters:
            waiter = slot.waiters.popleft()
            if not waiter.done():
                slot.active += 1
                waiter.set_result(slot.handle)
        if slot.active == 0:
            self._schedule_ttl(slot)

    def _fail_waiters(self, slot: Slot, err: Exception) -> None:
        while slot.waiters:
            waiter = slot.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(err)

    async def _make_room(self, slot: Slot) -> None:
        """Wait until `slot` fits the budget and the count limit, evicting as needed. Called
        with the admission lock held, so no other load decides at the same time."""
        need = slot.estimate
        if need > self.budget:
            raise errors.InsufficientMemory(
                f"Model '{slot.model.id}' needs about {format_bytes(need)}, more than the "
                f"whole memory budget of {format_bytes(self.budget)} "
                "(MLX_MANAGER_MEMORY_BUDGET). Nothing was unloaded."
            )
        drained: list[Slot] = []  # slots this load put in draining
        try:
            await self._evict_until_fits(slot, need, drained)
        finally:
            # However the wait ended (room freed elsewhere, the load abandoned or refused),
            # models drained for it that still run need not go any more. (At shutdown
            # everything stops anyway.)
            if not self._closing:
                self._resume(drained)

    def _resume(self, drained: list[Slot]) -> None:
        """Put drained models back to ready, serving what queued for them meanwhile (nothing
        else would: a queue is granted only on a move to ready). Not one whose unload has
        begun, nor one that unload() was asked for since: that caller waits to see it go."""
        resumed = False
        for slot in drained:
            if slot.state == "draining" and slot.drain_reason == EVICTED and not slot.unload_task:
                slot.state, slot.drain_reason = "ready", DRAINED
                self._grant(slot)
                resumed = True
        if resumed:
            self._notify()

    async def _evict_until_fits(self, slot: Slot, need: int, drained: list[Slot]) -> None:
        """_make_room's loop: evict idle models, else drain busy ones (added to `drained`),
        until `need` bytes and a place fit; refuse when pinned models leave no room."""
        limit = self.settings.max_loaded_models
        while True:
            if not slot.waiters:
                # Every request that wanted this model left while it waited: do not load it.
                raise LoadAbandoned
            others = [s for s in self.slots.values() if s is not slot and s.state in LOADED_STATES]
            used = sum(s.memory for s in others)
            if used + need <= self.budget and (limit is None or len(others) < limit):
                return
            # Refuse before evicting anything when even unloading every unpinned model would
            # not make room (a pinned model that is draining is on its way out: wait for it).
            pinned = [s for s in others if s.pinned and s.state != "draining"]
            pinned_bytes = sum(s.memory for s in pinned)
            if pinned_bytes + need > self.budget or (limit is not None and len(pinned) >= limit):
                raise errors.InsufficientMemory(
                    f"Model '{slot.model.id}' needs about {format_bytes(need)}, but pinned "
                    f"models hold {format_bytes(pinned_bytes)} of the "
                    f"{format_bytes(self.budget)} budget"
                    + (f" and the limit is {limit} loaded models" if limit else "")
                    + ". Unload a pinned model or raise the budget."
                )
            evictable = sorted(
                (s for s in others if s.state == "ready" and not s.pinned),
                key=lambda s: s.last_used,
            )
            idle = [s for s in evictable if s.idle]
            if idle:
                log.info(
                    "evicting %s (least recently used) to load %s", idle[0].model.id, slot.model.id
                )
                await self._unload(idle[0], EVICTED)
                continue
            if evictable:
                # Everything unpinned is busy: drain the least recently used, then retry.
                log.info("draining %s to make room for %s", evictable[0].model.id, slot.model.id)
                evictable[0].state, evictable[0].drain_reason = "draining", EVICTED
                self._cancel_ttl(evictable[0])
                drained.append(evictable[0])
            # Else what is left is loading or draining (the check above rules out pins alone).
            await self._wait_for_change()

    # Unloading ------------------------------------------------------------------------------

    def _start_unload(self, slot: Slot, reason: str, force: bool = False) -> asyncio.Task[None]:
        """The slot's one unload task: an eviction and a TTL expiry never both stop it."""
        if slot.unload_task is None:
            slot.unload_task = asyncio.create_task(self._stop_worker(slot, reason, force))
        return slot.unload_task

    async def _unload(self, slot: Slot, reason: str, force: bool = False) -> None:
        """Stop the slot's worker and wait until its process has exited."""
        await asyncio.shield(self._start_unload(slot, reason, force))

    async def _stop_worker(self, slot: Slot, reason: str, force: bool) -> None:
        try:
            handle = slot.handle
            if handle is None or slot.state not in ("ready", "draining"):
                return
            slot.state = "draining"
            self._cancel_ttl(slot)
            log.info("unloading %s: %s", slot.model.id, reason)
            if reason == EVICTED:
                self.metrics.evictions.labels(slot.model.id).inc()
            elif reason.startswith(IDLE):
                self.metrics.idle_unloads.labels(slot.model.id).inc()
            await handle.stop("it was force-unloaded" if force else reason)
            if slot.handle is handle:
                slot.state, slot.handle, slot.loaded_at = "unloaded", None, None
                slot.drain_reason = DRAINED
        finally:
            slot.unload_task = None
            self._notify()
        if slot.waiters and not self._closing:
            self._ensure_loading(slot)  # requests that arrived while it drained

    def _on_worker_exit(self, handle: Worker) -> None:
        """A worker died on its own (killed, out of memory): forget it, keep the pool exact."""
        for slot in self.slots.values():
            if slot.handle is handle and slot.state in ("ready", "draining"):
                if handle.stalled:
                    slot.stalls += 1
                    self.metrics.stalls.labels(slot.model.id).inc()
                else:
                    slot.crashes += 1
                    self.metrics.crashes.labels(slot.model.id).inc()
                slot.state, slot.handle, slot.loaded_at = "failed", None, None
                slot.error = handle.error
                self._cancel_ttl(slot)
                self._notify()
                if slot.waiters:
                    self._ensure_loading(slot)

    # Idle TTL ---------------------------------------------------------------------------------

    def _ttl(self, slot: Slot) -> float | None:
        """Seconds the slot may stay idle; None: forever."""
        if slot.pinned:
            return None
        if slot.keep_alive is not None:
            return None if slot.keep_alive < 0 else slot.keep_alive
        return slot.ttl if slot.ttl is not None else self.default_ttl

    def _schedule_ttl(self, slot: Slot) -> None:
        self._cancel_ttl(slot)
        ttl = self._ttl(slot)
        if ttl is not None and ttl < FOREVER:
            loop = asyncio.get_running_loop()
            slot.ttl_timer = loop.call_later(ttl, self._expire, slot)

    def _cancel_ttl(self, slot: Slot) -> None:
        if slot.ttl_timer is not None:
            slot.ttl_timer.cancel()
            slot.ttl_timer = None

    def _expire(self, slot: Slot) -> None:
        slot.ttl_timer = None
        if slot.state == "ready" and slot.idle and not slot.pinned:
            self._start_unload(slot, f"{IDLE} {self._ttl(slot) or 0:g}s")

    # Change notification ----------------------------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def _wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    # Explicit control (service layer for HTTP, MCP and CLI) -----------------------------------

    async def load(self, name: str) -> dict[str, Any]:
        """Load a model (if needed) and keep it: its idle TTL starts now."""
        resolved = self.resolve(name)
        slot = self._slot(resolved)
        (await self.acquire(resolved)).release(served=False)
        return self.slot_status(slot)

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        """Unload a model: gracefully (its running requests finish first) or, with force, at
        once (they fail with a clear error). Unloading a model that is not loaded succeeds."""
        resolved = self.resolve(name)
        slot = self.slots.get(resolved.key)
        if slot is None or slot.state not in LOADED_STATES:
            return {
                "model": resolved.model.id,
                "was_loaded": False,
                "message": f"Model '{resolved.model.id}' is not loaded.",
            }
        if slot.load_task is not None:
            await asyncio.shield(slot.load_task)
        freed = slot.memory
        if force or slot.active == 0:
            await self._unload(slot, "unloaded on request", force=force)
        else:
            slot.state, slot.drain_reason = "draining", "unloaded on request"
            self._cancel_ttl(slot)
            while slot.state == "draining":
                await self._wait_for_change()
        return {
            "model": resolved.model.id,
            "was_loaded": True,
            "freed_bytes": freed,
            "message": f"Model '{resolved.model.id}' was unloaded.",
        }

    async def preload(self, names: list[str]) -> None:
        """Load and pin models at startup; a failure is logged, not fatal."""
        for name in names:
            try:
                self._slot(self.resolve(name)).pinned = True
                await self.load(name)
            except errors.ServiceError as e:
                log.error("could not preload %s: %s", name, e.message)

    def memory_used(self) -> int:
        return sum(s.memory for s in self.slots.values())

    def slot_status(self, slot: Slot) -> dict[str, Any]:
        return slot.status(self._ttl(slot), self.queue_depth(slot))

    def snapshot(self) -> dict[str, Any]:
        """Every model's status (unloaded ones too), the budget and what is used of it: what
        the metrics read at each scrape."""
        return {
            "models": [self.slot_status(s) for s in list(self.slots.values())],
            "memory_budget_bytes": self.budget,
            "memory_used_bytes": self.memory_used(),
        }

    def status(self) -> list[dict[str, Any]]:
        """Models that are loaded, loading, draining or failed, or have requests waiting."""
        return [
            self.slot_status(s) for s in self.slots.values() if s.state != "unloaded" or s.waiters
        ]

    async def close(self, drain_seconds: float = 0.0) -> None:
        """Stop every worker: refuse new requests, give running ones `drain_seconds`, then stop."""
        self._closing = True
        if self.processes is not None:
            self.processes.close()
        deadline = time.monotonic() + drain_seconds
        while any(s.active for s in self.slots.values()) and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self._wait_for_change(), deadline - time.monotonic())
            except TimeoutError:
                break
        for slot in self.slots.values():
            self._cancel_ttl(slot)
            if slot.load_task is not None:
                slot.load_task.cancel()
            self._fail_waiters(slot, errors.ModelUnavailable("The server is shutting down."))
        await asyncio.gather(
            *(
                s.handle.stop("the server is shutting down")
                for s in self.slots.values()
                if s.handle is not None
            ),
            return_exceptions=True,
        )
