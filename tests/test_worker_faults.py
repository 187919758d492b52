"""Faults between the gateway and its workers, on a real server: requests far larger than a
socket buffer pass whole without harming the worker, and a worker that stops answering
(SIGSTOP) is noticed, killed and replaced, while a busy one is left alone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import psutil
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.conftest import NO_EOS, Models
from tests.server import Server, start_server

HELLO = [{"role": "user", "content": "hello world"}]
STALL = 2.0  # seconds without a heartbeat before a worker counts as hung


@pytest.fixture(scope="module")
def srv(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("faults") / "home"
    server = start_server(home, models.env(home, worker_stall_timeout=str(STALL)))
    yield server
    server.stop()


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def _metric(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _serves(server: Server, model: str) -> dict[str, Any]:
    """The model answers a small request; its worker's status."""
    r = _client(server).chat.completions.create(model=model, messages=HELLO, max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
    worker = server.worker(model)
    assert worker is not None and worker["state"] == "ready"
    return worker


def test_requests_larger_than_the_socket_buffer_leave_the_worker_usable(srv: Server) -> None:
    client = _client(srv)
    pid = _serves(srv, "tiny-c")["pid"]
    # A 300K-character prompt reaches the worker whole: the worker tokenizes it and refuses
    # it for the model's context, instead of the pipe breaking mid-frame.
    big = "lorem ipsum " * 25_000
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-c", messages=[{"role": "user", "content": big}], max_tokens=2
        )
    assert e.value.code == "context_length_exceeded"
    assert _serves(srv, "tiny-c")["pid"] == pid
    # 16 stop strings of 100K characters each (1.6 MB in one message) are honoured.
    stops = [f"{i}" + "z" * 100_000 for i in range(16)]
    r = httpx.post(
        srv.v1 + "/chat/completions",
        json={"model": "tiny-c", "messages": HELLO, "max_tokens": 3, "stop": stops},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    # A prompt list of 3,000 strings: 3,000 messages queued at once, far past the buffer.
    prompts = [f"prompt number {i}" for i in range(3000)]
    done = client.completions.create(model="tiny-c", prompt=prompts, max_tokens=1)
    assert len(done.choices) == 3000
    assert sorted(c.index for c in done.choices) == list(range(3000))
    worker = _serves(srv, "tiny-c")
    assert worker["pid"] == pid and worker["crashes"] == 0


def test_mcp_chat_with_a_large_prompt_leaves_the_worker_usable(srv: Server) -> None:
    pid = _serves(srv, "tiny-c")["pid"]

    async def chat() -> Any:
        async with httpx2.AsyncClient(timeout=120) as http:
            async with Client(streamable_http_client(srv.url + "/mcp", http_client=http)) as c:
                return await c.call_tool(
                    "chat",
                    {
                        "model": "tiny-c",
                        "messages": [{"role": "user", "content": "x " * 150_000}],
                        "max_tokens": 2,
                    },
                )

    result = asyncio.run(chat())
    assert result.is_error
    assert "maximum context length" in result.content[0].text
    assert _serves(srv, "tiny-c")["pid"] == pid


def test_stopped_worker_is_noticed_killed_and_replaced(srv: Server) -> None:
    client = _client(srv)
    pid = _serves(srv, "tiny-d")["pid"]
    stream = client.chat.completions.create(
        model="tiny-d", messages=HELLO, max_tokens=2000, stream=True, **NO_EOS
    )
    next(iter(stream))
    plain: dict[str, httpx.Response] = {}

    def request() -> None:
        body = {"model": "tiny-d", "messages": HELLO, "max_tokens": 2000, **NO_EOS}
        plain["r"] = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=120)

    waiter = threading.Thread(target=request)
    waiter.start()
    srv.wait_for(lambda: srv.worker("tiny-d")["in_flight"] == 2, what="both requests to run")
    os.kill(pid, signal.SIGSTOP)
    try:
        # The stream ends with an error event (SSE pings alone would keep it open forever).
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                pass
        assert "stopped answering" in str(e.value.message)
        waiter.join(120)
        r = plain["r"]
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "model_unavailable"
        assert "stopped answering" in r.json()["error"]["message"]
        worker = srv.wait_for(
            lambda: (w := srv.worker("tiny-d")) and w["state"] == "failed" and w,
            what="the stall to be recorded",
        )
        assert worker["stalls"] == 1 and worker["crashes"] == 0 and worker["pid"] is None
        assert "stopped answering" in worker["error"]
        assert _metric(srv, "mlx_manager_worker_stalls_total", model="tiny-d") == 1
        assert _metric(srv, "mlx_manager_model_state", model="tiny-d", state="failed") == 1
        log = httpx.get(srv.url + "/admin/logs/tiny-d", timeout=10).json()
        assert any("stopped answering" in line for line in log["lines"]), log
        srv.wait_for(lambda: not psutil.pid_exists(pid) or _zombie(pid), what="the kill")
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    # The next request starts a fresh worker.
    assert _serves(srv, "tiny-d")["pid"] != pid


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_worker_busy_in_a_long_prefill_is_not_judged_hung(srv: Server, models: Models) -> None:
    """A prefill longer than the stall timeout: the main thread sends nothing for its whole
    length, the heartbeat thread goes on beating, and the worker survives. Two long prompts
    prefilled together, so that the prefill outlasts the timeout on a fast machine too (one
    1500-token prompt took 1.9 s on a quiet one, under the 2 s timeout)."""
    _serves(srv, "tiny-big")
    tokenizer = AutoTokenizer.from_pretrained(models.path("tiny-big"))

    def prompt(start: int) -> str:  # distinct words: nothing from a prompt cache
        words = " ".join(f"w{i}" for i in range(start, start + 4000))
        return str(tokenizer.decode(tokenizer.encode(words)[:1900]))  # of 2048

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        srv.v1 + "/completions",
                        json={"model": "tiny-big", "prompt": prompt(start), "max_tokens": 1},
                    )
                    for start in (10_000, 20_000)
                )
            )

    for r in asyncio.run(both()):
        assert r.status_code == 200, r.text

    def rows() -> list[dict[str, Any]]:
        data = httpx.get(srv.url + "/admin/requests", params={"model": "tiny-big"}).json()
        found = [x for x in data["data"] if x["endpoint"] == "/v1/completions"]
        return found if len(found) >= 2 else []

    slowest = max(srv.wait_for(rows, what="the requests' log rows"), key=lambda x: x["ttft_ms"])
    # The check is meaningful only if the prefill really outlasted the stall timeout.
    assert slowest["ttft_ms"] > STALL * 1000, json.dumps(slowest)
    worker = srv.worker("tiny-big")
    assert worker["state"] == "ready" and worker["stalls"] == 0
