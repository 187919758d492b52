"""Model lifecycle under concurrency, on real servers with real workers: budget and LRU
eviction, draining, idle TTL, keep_alive, pinning, queue bound, allow-list, explicit control.

Every wait is a poll on the server's own state with a timeout, never a guessed sleep."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from config.store import Store
from tests.conftest import NO_EOS, Models
from tests.server import ROOT, Server, start_server

HELLO = [{"role": "user", "content": "hello world"}]
LOADED = ("loading", "ready", "draining")


@contextmanager
def serving(models: Models, tmp_path: Path, **settings: Any) -> Iterator[Server]:
    env = {"MLX_MANAGER_MODEL_DIRS": str(models.folder), "HF_HUB_CACHE": str(models.hf_cache)}
    env.update({f"MLX_MANAGER_{k.upper()}": str(v) for k, v in settings.items()})
    server = start_server(tmp_path / "home", env)
    try:
        yield server
    finally:
        server.stop()  # also asserts that no worker process outlives the server


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def ask(server: Server, model: str, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 4)
    return sdk(server).chat.completions.create(model=model, messages=HELLO, **kw)


def loaded(server: Server) -> list[str]:
    return [w["model"] for w in server.workers() if w["state"] in LOADED]


def gone(server: Server, model: str) -> bool:
    w = server.worker(model)
    return w is None or w["state"] not in LOADED


def call_info(server: Server, model: str) -> dict[str, Any]:
    """`mlx-manager models NAME --json` against the server."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "models",
            model,
            "--json",
            "--port",
            str(server.port),
        ],
        cwd=ROOT,
        env=server.env,
        text=True,
        capture_output=True,
        check=True,
    )
    return json.loads(r.stdout)


def admin(server: Server, action: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/{action}", json=body, timeout=120)


def _cmdline(process: psutil.Process) -> str:
    """A child's command line; empty for one that has exited meanwhile (a zombie holds no
    model), instead of an exception that would end the watch and let it under-count."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


class Watch:
    """Samples the server's loaded models and worker processes in the background, to check a
    limit was never exceeded while something ran."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.max_loaded = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process(self.server.proc.pid)
        while not self._stop.is_set():
            self.max_loaded = max(self.max_loaded, len(loaded(self.server)))
            workers = [p for p in me.children() if "gateway.engine.worker" in _cmdline(p)]
            self.max_processes = max(self.max_processes, len(workers))

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


def test_budget_of_one_model_alternating_requests(models: Models, tmp_path: Path) -> None:
    # No warm spare here, so that every worker process the watch sees holds a model.
    with serving(models, tmp_path, max_loaded_models=1, warm_spare=0) as server:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)

        async def one(i: int) -> Any:
            model = ("tiny-a", "tiny-b")[i % 2]
            if i % 3 == 0:  # a mix of streamed and plain requests
                stream = await client.chat.completions.create(
                    model=model, messages=HELLO, max_tokens=24, stream=True
                )
                return [c async for c in stream][-1].choices[0].finish_reason
            r = await client.chat.completions.create(model=model, messages=HELLO, max_tokens=24)
            return r.choices[0].finish_reason

        async def main() -> list[Any]:
            return await asyncio.gather(*(one(i) for i in range(12)))

        with Watch(server) as watch:
            results = asyncio.run(main())
            for i in range(6):  # and strictly alternating, one at a time
                assert ask(server, ("tiny-a", "tiny-b")[i % 2]).choices[0].finish_reason
        assert all(r in ("stop", "length") for r in results)
        assert watch.max_loaded == 1, "two models were loaded at once"
        assert watch.max_processes <= 1, "an evicted worker still ran when the next loaded"


def test_sixteen_concurrent_first_requests_load_once(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path, max_loaded_models=1) as server:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)

        async def main() -> list[Any]:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(model="tiny-c", messages=HELLO, max_tokens=3)
                    for _ in range(16)
                )
            )

        assert len(asyncio.run(main())) == 16
        w = server.worker("tiny-c")
        assert (w["loads"], w["requests_served"], w["state"]) == (1, 16, "ready")


def test_memory_budget_evicts_and_refuses_what_cannot_fit(models: Models, tmp_path: Path) -> None:
    # One tiny model (~0.6 MB in MLX) fits in 1 MB; two do not; tiny-big (~6 MB) never does.
    with serving(models, tmp_path, memory_budget="1MB") as server:
        status = lambda: httpx.get(server.url + "/admin/workers").json()  # noqa: E731
        assert status()["memory_estimate_factor"] == 1.2  # nothing measured yet
        ask(server, "tiny-a")
        # The factor is now what tiny-a measured: its real figure over its weights.
        weights = call_info(server, "tiny-a")["weights_bytes"]
        real = server.worker("tiny-a")["estimated_bytes"]
        assert status()["memory_estimate_factor"] == pytest.approx(min(3, max(1, real / weights)))
        pid = server.worker("tiny-a")["pid"]
        with pytest.raises(openai.APIStatusError) as e:
            ask(server, "tiny-big")
        assert e.value.status_code == 507
        assert "budget" in e.value.message and "Nothing was unloaded" in e.value.message
        assert server.worker("tiny-a")["pid"] == pid  # refused before anything was evicted
        ask(server, "tiny-b")  # evicts tiny-a (least recently used)
        assert loaded(server) == ["tiny-b"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        status = httpx.get(server.url + "/admin/workers").json()
        assert 0 < status["memory_used_bytes"] <= status["memory_budget_bytes"] == 1_000_000


def test_long_stream_survives_eviction_pressure_and_ttl(models: Models, tmp_path: Path) -> None:
    # tiny-big decodes at ~360 tok/s here: its 1200-token stream runs for seconds.
    with serving(models, tmp_path, max_loaded_models=1, idle_ttl="0.3s") as server:
        client = sdk(server)
        stream = client.chat.completions.create(
            model="tiny-big",
            messages=HELLO,
            max_tokens=1200,
            stream=True,
            stream_options={"include_usage": True},
            **NO_EOS,
        )
        chunks = iter(stream)
        next(chunks)
        # tiny-b needs tiny-big's place: it must wait for the stream instead of cutting it.
        other: dict[str, Any] = {}
        t = threading.Thread(target=lambda: other.update(r=ask(server, "tiny-b")))
        t.start()
        server.wait_for(
            lambda: (w := server.worker("tiny-big")) and w["state"] == "draining",
            what="tiny-big to drain",
        )
        rest = list(chunks)
        usage = rest[-1].usage
        finish = [c.choices[0].finish_reason for c in rest if c.choices][-1]
        assert finish in ("length", "stop")
        if finish == "length":
            assert usage.completion_tokens == 1200
        t.join(60)
        assert other["r"].choices[0].finish_reason in ("length", "stop")
        assert loaded(server) == ["tiny-b"]


def test_idle_ttl_unloads_and_never_during_a_request(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path, idle_ttl="1s") as server:
        r = ask(server, "tiny-big", max_tokens=800, **NO_EOS)  # ~2 s, twice the TTL
        assert r.choices[0].finish_reason in ("length", "stop")
        w = server.worker("tiny-big")
        assert (w["loads"], w["ttl_seconds"], w["state"]) == (1, 1, "ready")
        server.wait_for(lambda: gone(server, "tiny-big"), what="the idle TTL to unload it")
        server.wait_for(lambda: not psutil.pid_exists(w["pid"]), what="the worker to exit")
        ask(server, "tiny-big")  # and it comes back on demand
        assert server.worker("tiny-big")["loads"] == 2


def test_keep_alive(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path) as server:
        ask(server, "tiny-a", extra_body={"keep_alive": "5m"})
        assert server.worker("tiny-a")["ttl_seconds"] == 300
        ask(server, "tiny-a", extra_body={"keep_alive": -1})
        assert server.worker("tiny-a")["ttl_seconds"] is None  # forever
        ask(server, "tiny-a", extra_body={"keep_alive": 0})
        server.wait_for(lambda: gone(server, "tiny-a"), what="keep_alive 0 to unload")
        with pytest.raises(openai.BadRequestError) as e:
            ask(server, "tiny-a", extra_body={"keep_alive": "soon"})
        assert e.value.body["param"] == "keep_alive"


def test_pinned_model_survives_lru_and_ttl(models: Models, tmp_path: Path) -> None:
    with serving(
        models, tmp_path, preload="tiny-a", max_loaded_models=2, idle_ttl="0.5s"
    ) as server:
        w = server.wait_for(
            lambda: (x := server.worker("tiny-a")) and x["state"] == "ready" and x,
            what="the preloaded model",
        )
        assert w["pinned"] and w["ttl_seconds"] is None
        for model in ("tiny-b", "tiny-c", "tiny-b", "tiny-c"):
            ask(server, model)  # the second slot is all that LRU may use
        server.wait_for(lambda: gone(server, "tiny-c"), what="tiny-c's TTL")
        assert server.worker("tiny-a")["pid"] == w["pid"]
        assert server.worker("tiny-a")["loads"] == 1


def test_queue_overflow_gives_429_with_retry_after(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path, max_queue=2, batch_size=1) as server:
        client = sdk(server)
        streams = [
            client.chat.completions.create(
                model="tiny-a", messages=HELLO, max_tokens=3000, stream=True, **NO_EOS
            )
            for _ in range(3)
        ]  # one decoding, two queued in the worker
        r = httpx.post(
            server.v1 + "/chat/completions",
            timeout=30,
            json={"model": "tiny-a", "messages": HELLO, "max_tokens": 2},
        )
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        for s in streams:
            s.close()
        server.wait_for(lambda: server.worker("tiny-a")["in_flight"] == 0, what="streams to end")
        assert ask(server, "tiny-a").choices[0].finish_reason in ("length", "stop")


def test_client_leaving_the_queue_cancels_its_load(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path, max_loaded_models=1) as server:
        client = sdk(server)
        stream = client.chat.completions.create(
            model="tiny-big", messages=HELLO, max_tokens=1500, stream=True, **NO_EOS
        )
        chunks = iter(stream)
        next(chunks)
        pid = server.worker("tiny-big")["pid"]
        with pytest.raises(httpx.ReadTimeout):  # waits for tiny-big to drain, then gives up
            httpx.post(
                server.v1 + "/chat/completions",
                timeout=0.5,
                json={"model": "tiny-b", "messages": HELLO, "max_tokens": 2},
            )
        server.wait_for(
            lambda: gone(server, "tiny-b") and server.worker("tiny-big")["state"] == "ready",
            what="the abandoned load to be dropped",
        )
        rest = list(chunks)
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] in ("length", "stop")
        assert server.worker("tiny-big")["pid"] == pid
        assert server.worker("tiny-b") is None  # never loaded


def test_allow_list(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path, allowed_models="tiny-a,tiny-org/*") as server:
        for name in ("tiny-b", "no-such-model"):
            with pytest.raises(openai.PermissionDeniedError) as e:
                ask(server, name)
            assert e.value.code == "model_not_allowed"
        assert server.worker("tiny-b") is None
        assert ask(server, "tiny-a").choices[0].finish_reason
        assert ask(server, "tiny-org/tiny-hf").choices[0].finish_reason
        ids = {m.id for m in sdk(server).models.list()}
        assert ids == {"tiny-a", "tiny-org/tiny-hf"}
        assert admin(server, "load", model="tiny-b").status_code == 403


def test_explicit_load_and_unload(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path) as server:
        r = admin(server, "load", model="tiny-a")
        assert r.status_code == 200 and r.json()["state"] == "ready"
        assert r.json()["requests_served"] == 0
        r = admin(server, "unload", model="tiny-b")
        assert r.json()["was_loaded"] is False and "not loaded" in r.json()["message"]
        assert admin(server, "unload", model="nope").status_code == 404

        # Graceful: the running stream finishes; a request arriving meanwhile waits for the
        # reload rather than failing. (tiny-big: its stream lasts seconds.)
        stream = sdk(server).chat.completions.create(
            model="tiny-big", messages=HELLO, max_tokens=1200, stream=True, **NO_EOS
        )
        chunks = iter(stream)
        next(chunks)
        done: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: done.update(r=admin(server, "unload", model="tiny-big"))
        )
        t.start()
        server.wait_for(
            lambda: (w := server.worker("tiny-big")) and w["state"] == "draining", what="draining"
        )
        late = ask(server, "tiny-big")
        assert late.choices[0].finish_reason in ("length", "stop")
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
        t.join(60)
        assert done["r"].json()["was_loaded"] is True
        assert server.worker("tiny-big")["loads"] == 2

        # Forced: the running stream ends with a clear error.
        stream = sdk(server).chat.completions.create(
            model="tiny-big", messages=HELLO, max_tokens=1500, stream=True, **NO_EOS
        )
        chunks = iter(stream)
        next(chunks)
        assert admin(server, "unload", model="tiny-big", force=True).json()["was_loaded"]
        with pytest.raises(openai.APIError) as e:
            list(chunks)
        assert "force-unloaded" in str(e.value.message)
        assert gone(server, "tiny-big")


def test_cold_load_uses_the_warm_spare(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path) as server:
        status = lambda: httpx.get(server.url + "/admin/workers").json()  # noqa: E731
        spare = server.wait_for(
            lambda: (s := status()["spare"]) and s["warm"] and s["pid"], what="a warm spare"
        )
        assert admin(server, "load", model="tiny-a").json()["pid"] == spare
        # A new spare replaces it once the load is done.
        new = server.wait_for(
            lambda: (s := status()["spare"]) and s["warm"] and s["pid"], what="a new warm spare"
        )
        assert new != spare and psutil.pid_exists(new)


def test_profile_pin_and_ttl(models: Models, tmp_path: Path) -> None:
    # Profiles written to the real database before the server starts.
    store = Store(tmp_path / "home" / "mlx-manager.db")
    store.save_profile({"name": "always-a", "model": "tiny-a", "pinned": True})
    store.save_profile({"name": "brief-b", "model": "tiny-b", "ttl": 1})
    with serving(models, tmp_path) as server:
        w = server.wait_for(
            lambda: (x := server.worker("tiny-a")) and x["state"] == "ready" and x,
            what="the pinned profile's model to preload",
        )
        assert w["pinned"] and w["ttl_seconds"] is None
        ask(server, "brief-b")
        assert server.worker("tiny-b")["ttl_seconds"] == 1
        server.wait_for(lambda: gone(server, "tiny-b"), what="the profile's TTL")
        assert server.worker("tiny-a")["pid"] == w["pid"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_no_worker_outlives_the_gateway(models: Models, tmp_path: Path, sig: int) -> None:
    with serving(models, tmp_path) as server:
        for model in ("tiny-a", "tiny-b"):
            ask(server, model)
        me = psutil.Process(server.proc.pid)
        children = [p for p in me.children() if "gateway.engine.worker" in _cmdline(p)]
        assert len(children) == 3  # two models and the warm spare
        server.proc.send_signal(sig)
        server.proc.wait(30)
        gone_, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"workers outlived the gateway ({sig!r}): {alive}"
