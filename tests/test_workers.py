"""Worker processes: disconnects stop generation, crashes fail only their own requests,
shutdown leaves no process behind, and the offline demo model serves on a bare machine."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import NO_EOS, Models, Server, start_server

HELLO = [{"role": "user", "content": "hello world"}]
LONG = 1500  # tokens: far more than any test waits for


def _body(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, "max_tokens": LONG, **NO_EOS, **kw}


def _idle(server: Server, model: str) -> Any:
    w = server.worker(model)
    return w if w and w["worker_active"] == 0 and w["in_flight"] == 0 else None


def test_closing_a_stream_stops_generation(server: Server) -> None:
    with httpx.stream(
        "POST", server.v1 + "/chat/completions", json=_body("tiny-d", stream=True), timeout=60
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        before = server.worker("tiny-d")["generated_tokens"]
    w = server.wait_for(lambda: _idle(server, "tiny-d"), what="generation to stop")
    # Stopped within a few decode steps of the disconnect, far short of max_tokens.
    assert w["generated_tokens"] - before < LONG // 3, w


def test_abandoned_non_stream_request_stops_generation(server: Server) -> None:
    httpx.post(server.v1 + "/chat/completions", json=_body("tiny-d"), timeout=60)  # warm
    before = server.worker("tiny-d")["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.v1 + "/chat/completions", json=_body("tiny-d", max_tokens=LONG * 5), timeout=0.3
        )
    w = server.wait_for(lambda: _idle(server, "tiny-d"), what="generation to stop")
    assert w["generated_tokens"] - before < LONG * 2, w


def _kill_worker_when_generating(server: Server, model: str) -> int:
    w = server.wait_for(
        lambda: (x := server.worker(model)) and x["worker_active"] and x,
        what="the worker to generate",
    )
    os.kill(w["pid"], signal.SIGKILL)
    return w["pid"]


def test_killed_worker_fails_its_stream_cleanly_and_next_request_reloads(
    server: Server, client: openai.OpenAI
) -> None:
    chat = client.chat.completions
    chat.create(model="tiny-b", messages=HELLO, max_tokens=1)  # loaded
    stream = chat.create(model="tiny-b", messages=HELLO, max_tokens=LONG * 5, stream=True, **NO_EOS)
    next(iter(stream))
    pid = _kill_worker_when_generating(server, "tiny-b")
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "unavailable" in str(e.value.message) and "tiny-b" in str(e.value.message)
    r = chat.create(model="tiny-b", messages=HELLO, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert server.worker("tiny-b")["pid"] != pid


def test_killed_worker_gives_503_to_non_stream_request(
    server: Server, client: openai.OpenAI
) -> None:
    client.chat.completions.create(model="tiny-b", messages=HELLO, max_tokens=1)
    result: dict[str, httpx.Response] = {}

    def request() -> None:
        result["r"] = httpx.post(
            server.v1 + "/chat/completions", json=_body("tiny-b", max_tokens=LONG * 5), timeout=60
        )

    t = threading.Thread(target=request)
    t.start()
    _kill_worker_when_generating(server, "tiny-b")
    t.join(60)
    r = result["r"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_unavailable"
    # The pool forgot the dead worker: failed, holding no memory, not counted in the budget.
    w = server.wait_for(
        lambda: (x := server.worker("tiny-b")) and x["state"] == "failed" and x,
        what="the crash to be recorded",
    )
    assert w["memory_bytes"] == 0 and w["pid"] is None and w["crashes"] >= 1
    assert "exited unexpectedly" in w["error"]
    status = httpx.get(server.url + "/admin/workers").json()
    live = sum(x["memory_bytes"] for x in status["data"] if x["state"] == "ready")
    assert status["memory_used_bytes"] == live
    # Other models were not affected, and tiny-b comes back on the next request.
    for model in ("tiny-a", "tiny-b"):
        ok = client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        assert ok.choices[0].finish_reason in ("length", "stop")


def test_demo_model_on_a_bare_machine_and_clean_shutdown(tmp_path: Path) -> None:
    # No model folders, and a Hugging Face cache folder that does not exist.
    env = {"HF_HUB_CACHE": str(tmp_path / "no-such-cache"), "MLX_MANAGER_MODEL_DIRS": ""}
    server = start_server(tmp_path / "home", env)
    try:
        models = httpx.get(server.v1 + "/models").json()["data"]
        assert [m["id"] for m in models] == ["demo-random"]
        assert "random weights" in models[0]["description"]
        client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
        r = client.chat.completions.create(model="demo-random", messages=HELLO, max_tokens=4)
        assert r.usage.completion_tokens >= 1
        assert (tmp_path / "home" / "mlx-manager.db").is_file()
        log = (tmp_path / "home" / "logs" / "mlx-manager.log").read_text()
        assert "demo-random ready" in log
        assert server.worker("demo-random")["state"] == "ready"
    finally:
        server.stop()  # asserts that no worker process outlives the server


def test_shutdown_with_busy_workers_leaves_no_process(models: Models, tmp_path: Path) -> None:
    env = {"MLX_MANAGER_MODEL_DIRS": str(models.folder), "HF_HUB_CACHE": str(models.hf_cache)}
    server = start_server(tmp_path / "home", env)
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
        for model in ("tiny-a", "tiny-b"):
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=1)
        stream = client.chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=LONG, stream=True, **NO_EOS
        )
        next(iter(stream))
    finally:
        server.stop()
