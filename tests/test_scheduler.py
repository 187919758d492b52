"""The pool's scheduling, in milliseconds: a real ModelPool, Catalog and Store over tiny fake model
folders, with a fake worker whose load, memory, output and death each test decides.

Every wait is on the pool's own state or an event the test sets, never a guessed sleep; the only
sleeps give a TTL time to fire wrongly, and cannot fail a correct pool. tests/test_lifecycle.py
proves the same rules end to end with real worker processes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from config.settings import Settings
from config.store import Store
from gateway import errors
from gateway.catalog.local import LocalModel
from gateway.catalog.names import Catalog
from gateway.engine.handle import Sink
from gateway.engine.pool import EVICTED, IDLE, ModelPool
from gateway.engine.protocol import Failed, Finished, Started, Text
from gateway.engine.request import GenerationRequest
from gateway.engine.slot import Slot, Worker

# Weights in bytes. The budget is 1000: two 400s fit, three do not; "huge" never fits alone;
# "p600" pinned leaves room for one 400 but not for "x500".
SIZES = {"a": 400, "b": 400, "c": 400, "p600": 600, "x500": 500, "huge": 1200}
BUDGET = "1000"
TTL = 0.05
# A scenario that hangs fails here, not at pytest's 300 s timeout. Not a timing assertion:
# each test takes milliseconds.
DEADLINE = 10.0
HELLO = [{"role": "user", "content": "hi"}]
_rids = itertools.count()


@dataclass
class Plan:
    """What a model's workers do; shared by its successive workers, changed by the test."""

    load: asyncio.Event = field(default_factory=asyncio.Event)  # set: loading finishes
    generate: asyncio.Event = field(default_factory=asyncio.Event)  # set: requests finish
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set: stopping finishes
    fail: str | None = None  # the next load fails with this
    memory: int | None = None  # reported memory; None: its weights
    # Called back in the loop step after a load succeeds, before the pool's own next step.
    on_ready: Callable[[], object] | None = None

    def __post_init__(self) -> None:
        self.load.set()
        self.generate.set()
        self.stop.set()


class FakeWorker:
    """Implements gateway.pool.Worker: loads, answers "ok" and stops when its Plan says so,
    and dies when the test calls crash()."""

    def __init__(self, farm: Farm, model: LocalModel, on_exit: Callable[[Worker], None]) -> None:
        self.farm, self.model, self.on_exit = farm, model, on_exit
        self.plan = farm.plan(model.id)
        self.state = "loading"
        self.info: dict[str, Any] = {}
        self.error: str | None = None
        self.stalled = False
        self.worker_active = 0
        self.generated_tokens = 0
        self.tokens_per_second = 0.0
        self.pid: int | None = None  # no process: the metrics collector must skip it
        self.silent_seconds = 0.0
        self.served = 0
        self.stop_reason: str | None = None
        self.stopped = asyncio.Event()
        self._sinks: dict[str, Sink] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dead = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._sinks)

    async def start(self, timeout: float) -> None:
        alive = [w for w in self.farm.workers if w.state in ("loading", "ready")]
        self.farm.peak_loaded = max(self.farm.peak_loaded, len(alive))
        self.farm.peak_memory = max(
            self.farm.peak_memory, sum(w.plan.memory or w.model.weights_bytes for w in alive)
        )
        self.farm.log.append(("start", self.model.id))
        loaded = asyncio.ensure_future(self.plan.load.wait())
        dead = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait([loaded, dead], return_when=asyncio.FIRST_COMPLETED)
        finally:
            loaded.cancel()
            dead.cancel()
        if self.state == "loading" and self.plan.fail:
            self.state, self.error = "failed", self.plan.fail
            self.on_exit(self)  # as a real worker's failed load does; the pool ignores it
        if self.state != "loading":
            raise errors.ModelUnavailable(f"Model '{self.model.id}' failed: {self.error}")
        self.state = "ready"
        memory = self.plan.memory or self.model.weights_bytes
        self.info = {"memory_bytes": memory, "context_length": 4096, "load_seconds": 0.0}
        if self.plan.on_ready is not None:
            asyncio.get_running_loop().call_soon(self.plan.on_ready)

    def submit(self, req: dict[str, Any], sink: Sink) -> str:
        if self.state != "ready":
            raise errors.ModelUnavailable(f"Model '{self.model.id}' is not loaded.")
        rid = f"r{next(_rids)}"
        self._sinks[rid] = sink
        sink(Started(rid, 3, 0))
        task = asyncio.get_running_loop().create_task(self._generate(rid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return rid

    async def _generate(self, rid: str) -> None:
        await self.plan.generate.wait()
        self.finish(rid)

    def finish(self, rid: str | None = None) -> None:
        """Answer a request (the oldest running one if None), whatever the plan says."""
        rid = rid if rid is not None else next(iter(self._sinks))
        sink = self._sinks.pop(rid, None)
        if sink is not None:  # else cancelled, or failed by a stop or crash
            self.served += 1
            self.generated_tokens += 1
            self.farm.log.append(("done", self.model.id))
            sink(Text(rid, "ok", None))
            sink(Finished(rid, "stop", 1))

    def cancel(self, rid: str) -> None:
        self._sinks.pop(rid, None)

    async def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.farm.log.append(("stop", self.model.id))
        self.state = "stopped"
        self._fail_all(f"stopped before finishing: {reason}")
        await self.plan.stop.wait()  # a failed worker's process is reaped, which takes time too
        self.stopped.set()

    def crash(self, stalled: bool = False) -> None:
        """Die on its own, as a killed or hung process does: fail everything, tell the pool."""
        self.state, self.stalled = "failed", stalled
        self.error = "it stopped answering" if stalled else "killed by a signal"
        self.farm.log.append(("crash", self.model.id))
        self._fail_all(self.error)
        self._dead.set()
        self.on_exit(self)

    def _fail_all(self, why: str) -> None:
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            sink(Failed(rid, "ModelUnavailable", f"Model '{self.model.id}' is unavailable: {why}"))
        for task in list(self._tasks):
            task.cancel()


class Farm:
    """The worker factory given to the pool: makes FakeWorkers and remembers them."""

    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.plans: dict[str, Plan] = {}
        self.log: list[tuple[str, str]] = []  # ("start" | "done" | "stop" | "crash", model)
        self.peak_loaded = 0  # workers alive at once, seen at each start
        self.peak_memory = 0  # their memory

    def plan(self, model_id: str) -> Plan:
        return self.plans.setdefault(model_id, Plan())

    def __call__(
        self, model: LocalModel, options: dict[str, Any], on_exit: Callable[[Worker], None]
    ) -> FakeWorker:
        worker = FakeWorker(self, model, on_exit)
        self.workers.append(worker)
        return worker

    def of(self, model_id: str) -> list[FakeWorker]:
        return [w for w in self.workers if w.model.id == model_id]

    def last(self, model_id: str) -> FakeWorker:
        return self.of(model_id)[-1]


Scenario = Callable[[ModelPool, Farm], Coroutine[Any, Any, None]]


@dataclass
class World:
    models: Path  # a folder with a model folder per SIZES entry
    store: Store


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Shared by the tests, which only read it: creating a Store (its migrations) is most of
    what a test here would otherwise cost."""
    root = tmp_path_factory.mktemp("scheduler")
    for name, size in SIZES.items():
        (root / "models" / name).mkdir(parents=True)
        (root / "models" / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (root / "models" / name / "model.safetensors").write_bytes(b"\0" * size)
    return World(root / "models", Store(root / "mlx-manager.db"))


def run(world: World, scenario: Scenario, **settings: Any) -> Farm:
    """Run `scenario` against a fresh pool whose models are SIZES, then close the pool and
    check that no worker outlived it."""
    options: dict[str, Any] = {
        "home": world.models.parent / "home",
        "model_dirs": [world.models],
        "hf_cache": world.models.parent / "hf",
        "memory_budget": BUDGET,
        "idle_ttl": 0,  # forever, unless the test is about TTLs
        "warm_spare": False,
        **settings,
    }
    cfg = Settings(**options)
    catalog = Catalog(cfg, world.store)
    farm = Farm()

    async def main() -> None:
        pool = ModelPool(cfg, catalog, workers=farm)
        pool.start()
        try:
            await asyncio.wait_for(scenario(pool, farm), DEADLINE)
        finally:
            await pool.close()
        alive = [w.model.id for w in farm.workers if w.state in ("loading", "ready")]
        assert not alive, f"workers outlived the pool: {alive}"

    asyncio.run(main())
    return farm


async def ask(pool: ModelPool, name: str, keep_alive: float | None = None) -> str:
    request = GenerationRequest("chat", messages=HELLO)
    gen = await pool.generate(pool.resolve(name), [request], keep_alive)
    return (await gen.collect())[0].text


def asking(pool: ModelPool, name: str, keep_alive: float | None = None) -> asyncio.Task[str]:
    return asyncio.create_task(ask(pool, name, keep_alive))


async def until(condition: Callable[[], bool]) -> None:
    """Let the pool run until `condition` holds (the scenario's deadline bounds the wait)."""
    while not condition():
        await asyncio.sleep(0.001)


def status(pool: ModelPool, model: str) -> dict[str, Any]:
    for s in pool.status():
        if s["model"] == model:
            return s
    return {"model": model, "state": "unloaded", "queued": 0, "in_flight": 0}


def slot(pool: ModelPool, model: str) -> Slot:
    return next(s for s in pool.slots.values() if s.model.id == model)


def loaded(pool: ModelPool) -> set[str]:
    return {s["model"] for s in pool.status() if s["state"] in ("loading", "ready", "draining")}


def counter(pool: ModelPool, name: str, model: str) -> float:
    return (
        pool.metrics.registry.get_sample_value(f"mlx_manager_{name}_total", {"model": model}) or 0
    )


async def running(pool: ModelPool, farm: Farm, model: str, n: int = 1) -> None:
    """Until `n` requests run on the model's current worker."""
    await until(lambda: bool(farm.of(model)) and farm.last(model).running == n)


# Single flight ------------------------------------------------------------------------------


def test_concurrent_requests_share_one_load(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").load.clear()
        tasks = [asking(pool, "a") for _ in range(10)]
        await until(lambda: status(pool, "a")["queued"] == 10 and bool(farm.of("a")))
        assert len(farm.of("a")) == 1
        assert status(pool, "a")["state"] == "loading"
        farm.plan("a").load.set()
        assert await asyncio.gather(*tasks) == ["ok"] * 10
        assert len(farm.of("a")) == 1
        s = status(pool, "a")
        assert (s["loads"], s["requests_served"], s["state"]) == (1, 10, "ready")
        assert counter(pool, "model_loads", "a") == 1
        # The metrics read workers only through the protocol too.
        assert b"mlx_manager_models_loaded 1.0" in generate_latest(pool.metrics.registry)

    run(world, scenario)


def test_a_request_cancelled_as_its_model_is_granted_is_not_counted_as_served(
    world: World,
) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").load.clear()
        task = asking(pool, "a")
        await until(lambda: status(pool, "a")["queued"] == 1 and bool(farm.of("a")))
        # The pool grants the ready worker in the same step the load ends; the cancellation
        # is queued just before the request's own wake-up, so it lands in between.
        farm.plan("a").on_ready = task.cancel
        farm.plan("a").load.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        s = status(pool, "a")
        assert (s["state"], s["in_flight"], s["requests_served"]) == ("ready", 0, 0)

    run(world, scenario)


# LRU eviction -------------------------------------------------------------------------------


async def lru(pool: ModelPool, farm: Farm) -> None:
    """a and b fit, c does not beside them: the least recently used idle one makes room."""
    assert [await ask(pool, m) for m in ("a", "b", "a")] == ["ok"] * 3
    assert await ask(pool, "c") == "ok"
    assert loaded(pool) == {"a", "c"}
    assert farm.last("b").stop_reason == EVICTED
    assert farm.last("a").stop_reason is None
    assert farm.log.index(("stop", "b")) < farm.log.index(("start", "c"))
    assert counter(pool, "model_evictions", "b") == 1
    assert await ask(pool, "b") == "ok"  # now a is the least recently used
    assert loaded(pool) == {"b", "c"}
    assert farm.of("a")[0].stop_reason == EVICTED
    assert len(farm.of("b")) == 2


def test_lru_eviction_under_the_memory_budget(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        await lru(pool, farm)
        assert pool.memory_used() == 800
        assert farm.peak_memory <= 1000 and farm.peak_loaded == 2

    run(world, scenario)


def test_lru_eviction_under_max_loaded_models(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        await lru(pool, farm)
        assert farm.peak_loaded == 2

    run(world, scenario, memory_budget="1GB", max_loaded_models=2)


def test_the_budget_counts_what_workers_report(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").memory = 700  # more than its 400 bytes of weights
        assert await ask(pool, "a") == "ok"
        assert status(pool, "a")["memory_bytes"] == 700
        # b is estimated with a's ratio (1.75 x 400 = 700): it cannot join a.
        assert await ask(pool, "b") == "ok"
        assert farm.last("a").stop_reason == EVICTED and loaded(pool) == {"b"}
        assert pool.memory_used() == 400  # b's own figure, once loaded
        assert farm.peak_memory <= 1000

    run(world, scenario)


def test_a_model_larger_than_the_budget_is_refused_before_anything_is_evicted(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        assert [await ask(pool, m) for m in ("a", "b")] == ["ok", "ok"]
        with pytest.raises(errors.InsufficientMemory) as e:
            await ask(pool, "huge")
        assert e.value.status == 507 and "Nothing was unloaded" in e.value.message
        assert loaded(pool) == {"a", "b"} and not farm.of("huge")
        assert status(pool, "huge")["state"] == "failed"

    run(world, scenario)


# Draining -----------------------------------------------------------------------------------


def test_a_busy_model_finishes_its_request_before_it_is_evicted(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        first = asking(pool, "a")
        await running(pool, farm, "a")
        other = asking(pool, "b")
        await until(lambda: status(pool, "a")["state"] == "draining")
        # A request for the draining model waits; the other model waits for room.
        again = asking(pool, "a")
        await until(lambda: status(pool, "a")["queued"] == 1)
        assert not farm.of("b") and status(pool, "b")["queued"] == 1
        assert not first.done() and farm.last("a").stop_reason is None
        farm.plan("a").generate.set()
        assert [await first, await other, await again] == ["ok"] * 3
        a1, a2 = farm.of("a")
        assert a1.served == 1 and a1.stop_reason == EVICTED
        log = farm.log
        assert log.index(("done", "a")) < log.index(("stop", "a")) < log.index(("start", "b"))
        assert a2.served == 1 and farm.peak_loaded == 1

    run(world, scenario, max_loaded_models=1)


def test_a_load_nobody_waits_for_is_abandoned_and_drained_models_resume(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        first = asking(pool, "a")
        await running(pool, farm, "a")
        other = asking(pool, "b")
        await until(lambda: status(pool, "a")["state"] == "draining")
        late = asking(pool, "a")  # arrives while a drains: it waits
        await until(lambda: status(pool, "a")["queued"] == 1)
        other.cancel()
        await until(lambda: status(pool, "a")["state"] == "ready")
        assert status(pool, "b")["state"] == "unloaded" and not farm.of("b")
        # The request that queued during the drain runs on the same worker, beside the first.
        await running(pool, farm, "a", 2)
        farm.plan("a").generate.set()
        assert [await first, await late] == ["ok", "ok"]
        assert len(farm.of("a")) == 1 and farm.last("a").stop_reason is None
        assert status(pool, "a")["requests_served"] == 2
        with pytest.raises(asyncio.CancelledError):
            await other

    run(world, scenario, max_loaded_models=1)


def test_a_drained_model_keeps_its_place_when_room_comes_from_elsewhere(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        farm.plan("b").generate.clear()
        first = asking(pool, "a")
        await running(pool, farm, "a")
        second = asking(pool, "b")
        await running(pool, farm, "b")
        third = asking(pool, "c")
        await until(lambda: status(pool, "a")["state"] == "draining")  # the least recently used
        farm.last("b").crash()
        with pytest.raises(errors.ModelUnavailable):
            await second
        assert await third == "ok"  # loaded in the room b's crash freed
        assert status(pool, "a")["state"] == "ready"
        farm.plan("a").generate.set()
        assert await first == "ok"
        assert farm.last("a").stop_reason is None and loaded(pool) == {"a", "c"}

    run(world, scenario, memory_budget="1GB", max_loaded_models=2)


def test_an_unload_asked_for_during_a_drain_outlasts_the_abandoned_load(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        first = asking(pool, "a")
        await running(pool, farm, "a")
        other = asking(pool, "b")
        await until(lambda: status(pool, "a")["state"] == "draining")
        unloading = asyncio.create_task(pool.unload("a"))
        await until(lambda: slot(pool, "a").drain_reason == "unloaded on request")
        other.cancel()
        await until(lambda: slot(pool, "b").load_task is None)  # abandoned
        assert status(pool, "a")["state"] == "draining" and not unloading.done()
        farm.plan("a").generate.set()
        assert await first == "ok"
        assert (await unloading)["was_loaded"]
        assert farm.last("a").stop_reason == "unloaded on request"
        assert status(pool, "a")["state"] == "unloaded"

    run(world, scenario, max_loaded_models=1)


def test_graceful_and_forced_unload(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        first = asking(pool, "a")
        await running(pool, farm, "a")
        unloading = asyncio.create_task(pool.unload("a"))
        await until(lambda: status(pool, "a")["state"] == "draining")
        assert not unloading.done()
        farm.plan("a").generate.set()
        assert await first == "ok"
        assert (await unloading)["was_loaded"] and farm.last(
            "a"
        ).stop_reason == "unloaded on request"
        farm.plan("a").generate.clear()
        second = asking(pool, "a")
        await running(pool, farm, "a")
        await pool.unload("a", force=True)
        with pytest.raises(errors.ModelUnavailable):
            await second
        assert farm.last("a").stop_reason == "it was force-unloaded"
        assert not (await pool.unload("a"))["was_loaded"]

    run(world, scenario)


# Idle TTL and keep_alive --------------------------------------------------------------------


def test_the_idle_ttl_never_fires_during_a_request(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        first = asking(pool, "a")
        await running(pool, farm, "a")
        await asyncio.sleep(3 * TTL)  # the request outlasts the TTL several times over
        assert status(pool, "a")["state"] == "ready"
        second = asking(pool, "a")
        await running(pool, farm, "a", 2)
        worker = farm.last("a")
        worker.finish()  # the first ends; the second still runs
        assert await first == "ok"
        await asyncio.sleep(3 * TTL)
        assert status(pool, "a")["state"] == "ready" and worker.stop_reason is None
        farm.plan("a").generate.set()
        assert await second == "ok"
        # Now idle: the TTL, counted from the request's end, unloads it.
        await worker.stopped.wait()
        assert worker.stop_reason is not None and worker.stop_reason.startswith(IDLE)
        assert counter(pool, "model_idle_unloads", "a") == 1
        assert status(pool, "a")["state"] == "unloaded"

    run(world, scenario, idle_ttl=TTL)


def test_a_request_arriving_while_the_ttl_unloads_gets_a_fresh_worker(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        assert await ask(pool, "a") == "ok"
        farm.plan("a").stop.clear()  # the unload takes its time
        await until(lambda: farm.of("a")[0].stop_reason is not None)
        again = asking(pool, "a")
        await until(lambda: status(pool, "a")["queued"] == 1)
        assert status(pool, "a")["state"] == "draining"
        farm.plan("a").stop.set()
        assert await again == "ok"
        assert len(farm.of("a")) == 2

    run(world, scenario, idle_ttl=TTL)


def test_keep_alive(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        assert await ask(pool, "a", keep_alive=0) == "ok"  # unloads as soon as it is idle
        await farm.last("a").stopped.wait()
        assert farm.last("a").stop_reason == f"{IDLE} 0s"
        assert await ask(pool, "b", keep_alive=-1) == "ok"  # beats the 0.05 s default TTL
        assert status(pool, "b")["ttl_seconds"] is None
        assert await ask(pool, "c") == "ok"  # the default TTL still applies to others
        await farm.last("c").stopped.wait()
        assert status(pool, "b")["state"] == "ready" and farm.last("b").stop_reason is None

    run(world, scenario, idle_ttl=TTL)


def test_keep_alive_is_each_requests_own(world: World) -> None:
    """As in Ollama: a request without keep_alive gives the model the default TTL again; a
    keep_alive of 0 must not make it unload after every later request too."""

    async def scenario(pool: ModelPool, farm: Farm) -> None:
        assert await ask(pool, "a", keep_alive=0) == "ok"
        await farm.last("a").stopped.wait()
        assert await ask(pool, "a") == "ok"
        assert status(pool, "a")["ttl_seconds"] == 60 and status(pool, "a")["state"] == "ready"
        assert await ask(pool, "a", keep_alive=-1) == "ok"
        assert status(pool, "a")["ttl_seconds"] is None
        assert await ask(pool, "a") == "ok"
        assert status(pool, "a")["ttl_seconds"] == 60
        assert len(farm.of("a")) == 2

    run(world, scenario, idle_ttl=60)


# Pins ---------------------------------------------------------------------------------------


def test_pinned_models_are_never_evicted_or_expired(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        await pool.preload(["a"])  # loads and pins it; now it is the least recently used
        # (b and c never expire, so that only eviction can unload them.)
        assert [await ask(pool, m, keep_alive=-1) for m in ("b", "c", "b")] == ["ok"] * 3
        assert farm.of("b")[0].stop_reason == EVICTED and farm.last("c").stop_reason == EVICTED
        await asyncio.sleep(3 * TTL)
        assert status(pool, "a")["pinned"] and status(pool, "a")["state"] == "ready"
        assert len(farm.of("a")) == 1 and farm.last("a").stop_reason is None

    run(world, scenario, max_loaded_models=2, idle_ttl=TTL)


def test_a_model_that_cannot_fit_beside_pinned_ones_is_refused(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        await pool.preload(["p600"])
        assert await ask(pool, "a") == "ok"  # 600 + 400 fit
        with pytest.raises(errors.InsufficientMemory) as e:
            await ask(pool, "x500")  # 600 + 500 do not, whatever else is unloaded
        assert e.value.status == 507 and "pinned" in e.value.message
        # The refusal did not cost the unpinned model its place.
        assert loaded(pool) == {"p600", "a"} and farm.last("a").stop_reason is None
        assert not farm.of("x500")
        assert await ask(pool, "b") == "ok"  # one that fits evicts as usual
        assert loaded(pool) == {"p600", "b"}

    run(world, scenario)


def test_the_loaded_model_limit_counts_pinned_models(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        await pool.preload(["a"])
        with pytest.raises(errors.InsufficientMemory) as e:
            await ask(pool, "b")
        assert "limit is 1 loaded models" in e.value.message
        assert loaded(pool) == {"a"} and not farm.of("b")

    run(world, scenario, memory_budget="1GB", max_loaded_models=1)


# Failures -----------------------------------------------------------------------------------


def test_a_crash_fails_its_requests_and_the_next_request_gets_a_fresh_worker(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        tasks = [asking(pool, "a") for _ in range(2)]
        await running(pool, farm, "a", 2)
        farm.last("a").crash()
        for task in tasks:
            with pytest.raises(errors.ModelUnavailable) as e:
                await task
            assert e.value.status == 503
        s = status(pool, "a")
        assert (s["state"], s["crashes"], s["stalls"]) == ("failed", 1, 0)
        assert s["error"] == "killed by a signal"
        assert counter(pool, "worker_crashes", "a") == 1
        farm.plan("a").generate.set()
        assert await ask(pool, "a") == "ok"
        assert len(farm.of("a")) == 2 and status(pool, "a")["state"] == "ready"

    run(world, scenario)


def test_a_crash_while_draining_lets_the_waiting_load_through(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        first = asking(pool, "a")
        await running(pool, farm, "a")
        other = asking(pool, "b")
        await until(lambda: status(pool, "a")["state"] == "draining")
        late = asking(pool, "a")
        await until(lambda: status(pool, "a")["queued"] == 1)
        farm.last("a").crash()
        with pytest.raises(errors.ModelUnavailable):
            await first
        farm.plan("a").generate.set()
        # b loads in the room the crash freed; the queued a request then loads a fresh a.
        assert [await other, await late] == ["ok", "ok"]
        assert len(farm.of("a")) == 2 and farm.peak_loaded == 1

    run(world, scenario, max_loaded_models=1)


def test_a_request_during_a_failed_loads_cleanup_gets_a_load_of_its_own(world: World) -> None:
    """The failed worker is still stopping when the next request comes: that request is not
    part of the failed load, and must not wait forever for a load nobody starts."""

    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").fail = "no weights"
        farm.plan("a").stop.clear()  # the failed worker takes its time to stop
        with pytest.raises(errors.ModelUnavailable):
            await ask(pool, "a")
        farm.plan("a").fail = None
        late = asking(pool, "a")
        await until(lambda: status(pool, "a")["queued"] == 1)
        await asyncio.sleep(0.01)  # the pool had its chance to start a load, and did not
        assert len(farm.of("a")) == 1
        farm.plan("a").stop.set()
        assert await late == "ok"
        assert len(farm.of("a")) == 2

    run(world, scenario)


def test_a_failed_load_fails_its_waiters_and_the_next_request_retries(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").fail = "no weights"
        tasks = [asking(pool, "a") for _ in range(3)]
        for task in tasks:
            with pytest.raises(errors.ModelUnavailable):
                await task
        assert len(farm.of("a")) == 1
        assert status(pool, "a")["state"] == "failed"
        assert counter(pool, "model_load_failures", "a") == 1
        farm.plan("a").fail = None
        assert await ask(pool, "a") == "ok"
        assert len(farm.of("a")) == 2

    run(world, scenario)


def test_stalled_workers_are_counted_as_stalls(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").generate.clear()
        task = asking(pool, "a")
        await running(pool, farm, "a")
        farm.last("a").crash(stalled=True)
        with pytest.raises(errors.ModelUnavailable):
            await task
        s = status(pool, "a")
        assert (s["state"], s["stalls"], s["crashes"]) == ("failed", 1, 0)
        # A worker that hangs while it loads counts too.
        farm.plan("a").load.clear()
        loading = asking(pool, "a")
        await until(lambda: len(farm.of("a")) == 2)
        farm.last("a").crash(stalled=True)
        with pytest.raises(errors.ModelUnavailable):
            await loading
        s = status(pool, "a")
        assert (s["state"], s["stalls"], s["crashes"]) == ("failed", 2, 0)
        assert counter(pool, "worker_stalls", "a") == 2
        assert counter(pool, "worker_crashes", "a") == 0

    run(world, scenario)


# Queue limits -------------------------------------------------------------------------------


def test_a_full_queue_answers_429(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        farm.plan("a").load.clear()
        tasks = [asking(pool, "a") for _ in range(3)]
        await until(lambda: status(pool, "a")["queued"] == 3)
        with pytest.raises(errors.TooManyRequests) as e:
            await ask(pool, "a")
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
        farm.plan("a").load.set()
        assert await asyncio.gather(*tasks) == ["ok"] * 3

    run(world, scenario, max_queue=3)


def test_requests_beyond_the_batch_count_against_the_queue(world: World) -> None:
    async def scenario(pool: ModelPool, farm: Farm) -> None:
        assert await ask(pool, "a") == "ok"
        farm.plan("a").generate.clear()
        tasks = [asking(pool, "a") for _ in range(3)]  # one in the batch, two beyond it
        await running(pool, farm, "a", 3)
        assert status(pool, "a")["queued"] == 2
        with pytest.raises(errors.TooManyRequests):
            await ask(pool, "a")
        farm.plan("a").generate.set()
        assert await asyncio.gather(*tasks) == ["ok"] * 3

    run(world, scenario, batch_size=1, max_queue=2)
