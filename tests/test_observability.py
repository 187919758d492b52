"""Observability on real servers: /metrics scraped with Prometheus' own parser, the request log
through HTTP, MCP and the CLI, retention, per-worker logs with a real crash, `ps`, and the
per-request log line with its x-request-id."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from config.store import Store
from gateway.observe.requestlog import RequestLog, RequestRecord
from tests.conftest import NO_EOS, Models
from tests.server import ROOT, Server, free_port, start_server
from tests.test_cli import as_json, cli
from tests.test_mcp import call, error

HELLO = [{"role": "user", "content": "hello world"}]
CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def srv(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("observe") / "home"
    server = start_server(home, models.env(home))
    yield server
    server.stop()


def sdk(server: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=60)


def cli_env(server: Server) -> dict[str, str]:
    return {**server.env, "MLX_MANAGER_PORT": str(server.port)}


def scrape(server: Server, headers: dict[str, str] | None = None) -> Samples:
    r = httpx.get(server.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rows(server: Server, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/admin/requests", params=params, headers=server.headers)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def row(server: Server, request_id: str) -> dict[str, Any]:
    """The request log's row for one request id (written within a moment of its end)."""
    found = server.wait_for(
        lambda: [r for r in rows(server, limit=1000) if r["request_id"] == request_id],
        what=f"request {request_id} in the request log",
    )
    assert len(found) == 1
    return found[0]


def rid(name: str) -> dict[str, Any]:
    return {"extra_headers": {"x-request-id": name}}


@contextmanager
def running_cli(server: Server, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A CLI command that runs until Ctrl-C (--watch, --follow): it must then exit cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        env={**os.environ, **cli_env(server)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr


# /metrics -------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latency(srv: Server) -> None:
    client = sdk(srv)
    before = scrape(srv)
    # EOS banned: each answer runs to max_tokens, so each has a decode speed to observe.
    plain = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=8, **NO_EOS)
    streamed = client.chat.completions.create(
        model="tiny-a",
        messages=HELLO,
        max_tokens=6,
        **NO_EOS,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in streamed if c.usage][0]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-a", messages=HELLO, temperature=7)
    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"model": "tiny-a", "endpoint": CHAT, "status": "200"}
    assert delta("mlx_manager_requests_total", **ok) == 2
    # Unresolved names are counted under model="" (a typo must not make a new series).
    assert delta("mlx_manager_requests_total", model="", endpoint=CHAT, status="404") == 1
    assert delta("mlx_manager_requests_total", model="", endpoint=CHAT, status="400") == 1
    assert not any(dict(k[1]).get("model") == "no-such-model" for k in after)
    prompt = plain.usage.prompt_tokens + usage.prompt_tokens
    completion = plain.usage.completion_tokens + usage.completion_tokens
    assert delta("mlx_manager_prompt_tokens_total", model="tiny-a") == prompt
    assert delta("mlx_manager_completion_tokens_total", model="tiny-a") == completion
    assert delta("mlx_manager_time_to_first_token_seconds_count", model="tiny-a") == 2
    assert delta("mlx_manager_time_to_first_token_seconds_sum", model="tiny-a") > 0
    assert delta("mlx_manager_request_duration_seconds_count", model="tiny-a", endpoint=CHAT) == 2
    assert delta("mlx_manager_decode_tokens_per_second_count", model="tiny-a") == 2
    inf = {"model": "tiny-a", "le": "+Inf"}
    assert value(after, "mlx_manager_time_to_first_token_seconds_bucket", **inf) >= 2
    # The load that served them, and the pool's state at scrape time.
    assert value(after, "mlx_manager_model_loads_total", model="tiny-a") >= 1
    assert value(after, "mlx_manager_model_load_duration_seconds_count", model="tiny-a") >= 1
    assert value(after, "mlx_manager_model_state", model="tiny-a", state="ready") == 1
    assert value(after, "mlx_manager_model_state", model="tiny-a", state="loading") == 0
    memory = value(after, "mlx_manager_model_memory_bytes", model="tiny-a")
    assert memory > 0
    assert value(after, "mlx_manager_worker_resident_memory_bytes", model="tiny-a") > memory
    assert value(after, "mlx_manager_memory_used_bytes") >= memory
    assert value(after, "mlx_manager_memory_budget_bytes") > value(after, "mlx_manager_memory_used")
    assert value(after, "mlx_manager_model_requests_in_flight", model="tiny-a") == 0
    assert value(after, "mlx_manager_models_loaded") >= 1
    # Prometheus conventions: our prefix, counters end in _total, units in the name.
    families = list(text_string_to_metric_families(httpx.get(srv.url + "/metrics").text))
    ours = [f for f in families if not f.name.startswith(("process_", "python_"))]
    assert ours and all(f.name.startswith("mlx_manager_") for f in ours)
    for f in ours:
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
        if f.type == "histogram":
            assert f.name.endswith(("_seconds", "_per_second")), f.name
    assert value(after, "process_resident_memory_bytes") > 0


def test_gauges_ps_and_cancelled_request_while_a_stream_runs(srv: Server) -> None:
    # tiny-big: its 1500 tokens take long enough on a busy machine that the stream still
    # runs while the CLI is asked twice and the metrics scraped.
    env = cli_env(srv)
    stream = sdk(srv).chat.completions.create(
        model="tiny-big", messages=HELLO, max_tokens=1500, stream=True, **NO_EOS, **rid("t-cut")
    )
    next(iter(stream))
    # tokens/s comes from the worker's reports, at least twice a second while it generates.
    ps = srv.wait_for(
        lambda: [
            r for r in as_json(env, "ps") if r["model"] == "tiny-big" and r["tokens_per_second"] > 0
        ],
        what="tiny-big's tokens/s in ps",
    )[0]
    assert ps["state"] == "ready" and ps["in_flight"] == 1
    table = cli(env, "ps")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "MODEL",
        "STATE",
        "PID",
        "MEMORY",
        "UPTIME",
        "IDLE",
        "TTL",
        "LEFT",
        "QUEUE",
        "RUNNING",
        "SERVED",
        "TOK/S",
    ]
    line = next(x.split() for x in lines if x.startswith("tiny-big "))
    assert line[1] == "ready" and line[3 + 1] in ("KiB", "MiB", "GiB")  # "1.2 MiB"
    assert int(line[-3]) == 1 and float(line[-1]) > 0  # running, tokens/s
    assert "budget" in lines[-1]
    samples = scrape(srv)
    assert value(samples, "mlx_manager_model_requests_in_flight", model="tiny-big") == 1
    assert value(samples, "mlx_manager_model_tokens_per_second", model="tiny-big") > 0
    assert value(samples, "mlx_manager_model_queue_depth", model="tiny-big") == 0
    stream.close()
    cut = row(srv, "t-cut")
    assert cut["status"] == 499 and "disconnected" in cut["error"]
    assert cut["completion_tokens"] >= 1 and cut["stream"] is True
    srv.wait_for(lambda: srv.worker("tiny-big")["tokens_per_second"] == 0, what="tiny-big idle")


def test_ps_watch_redraws_until_interrupted(srv: Server) -> None:
    with running_cli(srv, "ps", "--watch", "--interval", "0.2") as proc:
        assert proc.stdout is not None
        headers = 0
        deadline = time.monotonic() + 60
        while headers < 3 and time.monotonic() < deadline:
            headers += "every 0.2s" in proc.stdout.readline()
        assert headers == 3


# The request log -------------------------------------------------------------------------------


def test_request_log_rows_for_good_bad_and_failed_requests(srv: Server, models: Models) -> None:
    client = sdk(srv)
    good = client.chat.completions.with_raw_response.create(
        model="tiny-a", messages=HELLO, max_tokens=5, **rid("t-good")
    )
    assert good.headers["x-request-id"] == "t-good"
    answer = good.parse()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, **rid("t-404"))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-a", prompt="hi", top_p=9, **rid("t-400"))
    # A stream that fails after it started: the worker is unloaded by force under it.
    failing = client.chat.completions.create(
        model="tiny-c", messages=HELLO, max_tokens=1500, stream=True, **NO_EOS, **rid("t-503")
    )
    chunks = iter(failing)
    next(chunks), next(chunks)  # the role, then a first token
    httpx.post(srv.url + "/admin/unload", json={"model": "tiny-c", "force": True}, timeout=30)
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    # A profile, and the plain completions endpoint.
    httpx.post(srv.url + "/admin/profiles", json={"name": "obs-p", "model": "tiny-a"}).json()
    # (Random weights may end a sampled answer early: compare with what the answer reports.)
    profiled = client.completions.create(
        model="obs-p", prompt="hello", max_tokens=3, **rid("t-profile")
    )

    r = row(srv, "t-good")
    assert (r["model"], r["endpoint"], r["status"], r["error"]) == ("tiny-a", CHAT, 200, None)
    assert r["prompt_tokens"] == answer.usage.prompt_tokens
    assert r["completion_tokens"] == answer.usage.completion_tokens
    assert r["cached_tokens"] == answer.usage.prompt_tokens_details.cached_tokens
    assert r["finish_reason"] == answer.choices[0].finish_reason
    assert 0 < r["ttft_ms"] <= r["duration_ms"] and r["stream"] is False
    assert datetime.fromisoformat(r["time"]) > datetime.now(UTC) - timedelta(minutes=5)
    missing = row(srv, "t-404")
    assert (missing["status"], missing["model"]) == (404, "no-such-model")
    assert "does not exist" in missing["error"] and missing["prompt_tokens"] is None
    invalid = row(srv, "t-400")
    assert invalid["status"] == 400 and "top_p" in invalid["error"]
    assert invalid["endpoint"] == "/v1/completions"
    failed = row(srv, "t-503")
    assert failed["status"] == 503 and "force-unloaded" in failed["error"]
    assert failed["completion_tokens"] >= 1
    via_profile = row(srv, "t-profile")
    assert (via_profile["model"], via_profile["profile"]) == ("tiny-a", "obs-p")
    assert via_profile["completion_tokens"] == profiled.usage.completion_tokens
    assert via_profile["finish_reason"] == profiled.choices[0].finish_reason

    # Filters, the same over HTTP, MCP and the CLI.
    assert {r["request_id"] for r in rows(srv, status=404)} >= {"t-404"}
    assert all(r["status"] >= 400 for r in rows(srv, errors="1"))
    assert {r["profile"] for r in rows(srv, model="obs-p")} == {"obs-p"}
    assert [r["request_id"] for r in rows(srv, limit=1)] == ["t-profile"]
    url = srv.url + "/mcp"
    logged = call(url, "request_log", status=503)["requests"]
    assert "t-503" in {r["request_id"] for r in logged}
    assert all(r["status"] == 503 for r in logged)
    by_cli = as_json(cli_env(srv), "logs", "--model", "tiny-a", "--requests", "--since", "1h")
    assert {"t-good", "t-profile"} <= {r["request_id"] for r in by_cli}
    assert all("tiny-a" in (r["model"], r["profile"]) for r in by_cli)
    table = cli(cli_env(srv), "logs", "--errors", "-n", "200")
    assert table.returncode == 0 and "t-404" in table.stdout and "t-good" not in table.stdout
    # Bad filters are errors in each protocol's shape.
    bad = httpx.get(srv.url + "/admin/requests", params={"since": "yesterday-ish"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    bad = httpx.get(srv.url + "/admin/requests", params={"limit": "lots"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    assert "since" in error(url, "request_log", since="last tuesday")
    assert cli(cli_env(srv), "logs", "--since", "soon").returncode == 1
    # Prompts and completions are not stored unless asked (MLX_MANAGER_LOG_CONTENT).
    with sqlite3.connect(srv.home / "mlx-manager.db") as db:
        stored = db.execute("SELECT count(*) FROM requests WHERE prompt IS NOT NULL").fetchone()
    assert stored == (0,)


def test_request_ids_and_structured_log_lines(srv: Server) -> None:
    a = httpx.get(srv.v1 + "/models")
    b = httpx.get(srv.v1 + "/models")
    assert a.headers["x-request-id"].startswith("req_")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    # A client's own id is kept when it is sane, replaced when it is not.
    assert httpx.get(srv.url + "/health", headers={"x-request-id": "abc-1"}).headers[
        "x-request-id"
    ] == ("abc-1")
    odd = httpx.get(srv.v1 + "/models", headers={"x-request-id": "bad id\twith spaces"})
    assert odd.headers["x-request-id"].startswith("req_")
    nowhere = httpx.get(srv.url + "/no/such/path", headers={"x-request-id": "t-nowhere"})
    assert nowhere.status_code == 404 and nowhere.headers["x-request-id"] == "t-nowhere"
    answer = sdk(srv).chat.completions.create(
        model="tiny-a", messages=HELLO, max_tokens=2, **rid("t-line")
    )
    log = srv.home / "logs" / "mlx-manager.log"
    line = srv.wait_for(
        lambda: next((x for x in log.read_text().splitlines() if "id=t-line " in x), None),
        what="the request's log line",
    )
    for field in ("method=POST", f"path={CHAT}", "status=200", "model=tiny-a"):
        assert field in line, line
    assert f"completion_tokens={answer.usage.completion_tokens} " in line
    assert "ttft_ms=" in line and "duration_ms=" in line
    assert "id=t-nowhere " in log.read_text()  # every request has its line, not only /v1


def test_logs_follow_prints_new_requests(srv: Server) -> None:
    with running_cli(srv, "logs", "--follow", "--json", "-n", "1") as proc:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # the newest row so far
        assert first["id"] > 0
        sdk(srv).chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=2, **rid("t-follow")
        )
        followed = json.loads(proc.stdout.readline())
        assert followed["request_id"] == "t-follow" and followed["status"] == 200


# Per-worker logs -------------------------------------------------------------------------------


def test_crashed_worker_traceback_through_mcp_and_cli(srv: Server) -> None:
    url = srv.url + "/mcp"
    sdk(srv).chat.completions.create(model="tiny-d", messages=HELLO, max_tokens=2)
    pid = srv.worker("tiny-d")["pid"]
    os.kill(pid, signal.SIGSEGV)  # as a fault inside MLX would
    srv.wait_for(lambda: srv.worker("tiny-d")["state"] == "failed", what="the crash")
    found = call(url, "worker_logs", model="tiny-d", lines=200)
    text = "\n".join(found["lines"])
    assert found["model"] == "tiny-d" and found["file"].endswith("tiny-d.log")
    assert f"loading {srv.env['MLX_MANAGER_MODEL_DIRS']}/tiny-d (pid {pid})" in text
    assert "Fatal Python error: Segmentation fault" in text
    assert 'gateway/engine/worker.py", line' in text  # the Python traceback of the crashed worker
    assert (
        f"worker pid {pid} failed: the worker process exited unexpectedly (killed by SIGSEGV)"
        in text
    )
    assert "killed by SIGSEGV" in srv.worker("tiny-d")["error"]
    # The next request starts a fresh worker, which writes to the same log.
    sdk(srv).chat.completions.create(model="tiny-d", messages=HELLO, max_tokens=2)
    new_pid = srv.worker("tiny-d")["pid"]
    tail = cli(cli_env(srv), "logs", "--model", "tiny-d", "-n", "5")
    assert tail.returncode == 0 and f"(pid {new_pid})" in tail.stdout
    assert len(tail.stdout.splitlines()) == 5
    assert call(url, "worker_logs", model="tiny-d", lines=1)["lines"][0].endswith("tokens")
    # Scraped: one crash, two loads.
    samples = scrape(srv)
    assert value(samples, "mlx_manager_worker_crashes_total", model="tiny-d") == 1
    assert value(samples, "mlx_manager_model_loads_total", model="tiny-d") == 2


def test_failed_load_leaves_its_traceback(srv: Server) -> None:
    r = httpx.post(
        srv.v1 + "/chat/completions", json={"model": "broken", "messages": HELLO}, timeout=60
    )
    assert r.status_code == 503
    shown = cli(cli_env(srv), "logs", "--model", "broken")
    assert shown.returncode == 0, shown.stderr
    assert "load failed" in shown.stdout and "Traceback (most recent call last)" in shown.stdout
    assert "broken" in shown.stdout
    failures = value(scrape(srv), "mlx_manager_model_load_failures_total", model="broken")
    assert failures >= 1
    # The server's own log names the file instead of repeating the traceback.
    server_log = (srv.home / "logs" / "mlx-manager.log").read_text()
    assert "traceback in" in server_log and "Traceback" not in server_log
    url = srv.url + "/mcp"
    # tiny-b: no test on this server loads it.
    assert "No worker log for 'tiny-b'" in error(url, "worker_logs", model="tiny-b")
    assert "lines" in error(url, "worker_logs", model="tiny-a", lines=0)
    missing = httpx.get(srv.url + "/admin/logs/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert cli(cli_env(srv), "logs", "--model", "tiny-b").returncode == 1


def test_worker_log_follow(srv: Server) -> None:
    sdk(srv).chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=1)
    with running_cli(srv, "logs", "--model", "tiny-a", "-f", "-n", "1") as proc:
        assert proc.stdout is not None
        proc.stdout.readline()  # the last line so far
        httpx.post(srv.url + "/admin/unload", json={"model": "tiny-a"}, timeout=30)
        deadline = time.monotonic() + 30
        seen = ""
        while "stopping" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert "stopping worker pid" in seen and "unloaded on request" in seen


# Keys, usage, retention, content ---------------------------------------------------------------


def test_usage_stats_per_model_and_key(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = models.env(home, max_loaded_models="1")  # each switch of model evicts the other
    keys = {n: as_json(env, "keys", "create", "--name", n)["key"] for n in ("alice", "bob")}
    server = start_server(home, env)
    try:
        alice, bob = sdk(server, keys["alice"]), sdk(server, keys["bob"])
        answers = [
            alice.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=n, **NO_EOS)
            for n in (3, 4)
        ]
        answers.append(bob.chat.completions.create(model="tiny-b", messages=HELLO, max_tokens=5))
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.create(model="no-such-model", messages=HELLO)
        # MCP's chat tool is logged too, under the key its session used.
        url = server.url + "/mcp"
        reply = keyed(url, keys["alice"], "chat", model="tiny-a", messages=HELLO, max_tokens=2)

        stats = keyed(url, keys["bob"], "usage_stats", since="1h", by="key")
        by_key = {r["key_name"]: r for r in stats["rows"]}
        assert by_key["alice"]["requests"] == 3 and by_key["alice"]["errors"] == 0
        assert by_key["bob"]["requests"] == 2 and by_key["bob"]["errors"] == 1
        alice_tokens = sum(a.usage.completion_tokens for a in answers[:2])
        alice_tokens += reply["usage"]["completion_tokens"]
        assert by_key["alice"]["completion_tokens"] == alice_tokens
        assert by_key["bob"]["prompt_tokens"] == answers[2].usage.prompt_tokens
        assert stats["total"]["requests"] == 5
        by_model = {r["model"]: r for r in keyed(url, keys["bob"], "usage_stats")["rows"]}
        assert by_model["tiny-a"]["requests"] == 3 and by_model["tiny-b"]["requests"] == 1
        assert by_model["tiny-a"]["avg_ttft_ms"] > 0
        assert by_model["tiny-a"]["tokens_per_second"] > 0
        both = keyed(url, keys["bob"], "usage_stats", by="model,key")["rows"]
        assert {(r["model"], r["key_name"]) for r in both} == {
            ("tiny-a", "alice"),
            ("tiny-b", "bob"),
            ("no-such-model", "bob"),
        }
        logged = keyed(url, keys["bob"], "request_log")["requests"]
        mcp_rows = [r for r in logged if r["endpoint"] == "mcp:chat"]
        assert len(mcp_rows) == 1 and mcp_rows[0]["key_name"] == "alice"
        assert "by" in keyed(url, keys["bob"], "usage_stats", by="colour")
        # The CLI agrees; its table ends with the total.
        cli_env_ = {**env, "MLX_MANAGER_PORT": str(server.port)}
        assert as_json(cli_env_, "usage", "--by", "key")["total"]["requests"] == 5
        table = cli(cli_env_, "usage").stdout.splitlines()
        assert table[-1].split()[:2] == ["(all)", "5"]
        # /metrics needs a key once keys exist (it names models), and works with one.
        assert httpx.get(server.url + "/metrics").status_code == 401
        samples = scrape(server, {"Authorization": f"Bearer {keys['bob']}"})
        mcp_chat = {"model": "tiny-a", "endpoint": "mcp:chat", "status": "200"}
        assert value(samples, "mlx_manager_requests_total", **mcp_chat) == 1
        # tiny-a, then tiny-b (evicting tiny-a), then tiny-a again (evicting tiny-b).
        assert value(samples, "mlx_manager_model_evictions_total", model="tiny-a") == 1
        assert value(samples, "mlx_manager_model_evictions_total", model="tiny-b") == 1
        assert value(samples, "mlx_manager_model_loads_total", model="tiny-a") == 2
        evicted = keyed(url, keys["bob"], "worker_logs", model="tiny-b")["lines"]
        assert any("stopping worker pid" in x and "evicted to make room" in x for x in evicted)
        log = (home / "logs" / "mlx-manager.log").read_text()
        assert "key=alice" in log and "key=bob" in log
        assert keys["alice"] not in log and keys["bob"] not in log
    finally:
        server.stop()


def keyed(url: str, key: str, tool: str, **args: Any) -> Any:
    """Call an MCP tool on a server that needs a key: the tool's result, or its error text."""

    async def main() -> Any:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
            transport = streamable_http_client(url, http_client=http)
            async with Client(transport, cache=None) as client:
                return await client.call_tool(tool, args)

    result = asyncio.run(main())
    return result.content[0].text if result.is_error else result.structured_content


def test_request_log_off_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    for retention, expected in (("0", 0), ("2", 2)):
        settings = load_settings(
            environ={"MLX_MANAGER_HOME": str(tmp_path), "MLX_MANAGER_LOG_RETENTION": retention}
        )
        log = RequestLog(settings, store)
        for i in range(3):
            record = RequestRecord(CHAT, request_id=f"{retention}-{i}")
            record.end(200, complete=True)
            log.add(record.row())
        log.close()
        assert len(store.requests(since=None)) == expected
        store.db.execute("DELETE FROM requests")
        store.db.conn.commit()
    # Without a server the CLI reads the database itself, and says why it is empty.
    env = {"MLX_MANAGER_HOME": str(tmp_path), "MLX_MANAGER_PORT": str(free_port())}
    shown = cli({**env, "MLX_MANAGER_LOG_RETENTION": "0"}, "logs")
    assert shown.returncode == 0 and "the request log is off" in shown.stdout, shown.stderr
    assert cli(env, "logs").stdout.strip() == "(none)"


def test_retention_and_content(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    now = datetime.now(UTC)
    seeded = [
        {"request_id": name, "time": (now - age).isoformat(timespec="milliseconds")}
        for name, age in (("t-old", timedelta(days=2)), ("t-recent", timedelta(hours=1)))
    ]
    Store(home / "mlx-manager.db").add_requests(
        [{**r, "endpoint": CHAT, "model": "tiny-a", "status": 200} for r in seeded]
    )
    env = models.env(home, log_retention="1d,4", log_content="1", log_format="json")
    server = start_server(home, env)
    try:
        # At startup the row older than a day goes; the one from an hour ago stays.
        server.wait_for(
            lambda: {r["request_id"] for r in rows(server)} == {"t-recent"}, what="age pruning"
        )
        client = sdk(server)
        answer = client.chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=4, **rid("t-content")
        )
        stream = client.completions.create(
            model="tiny-a", prompt="once upon", max_tokens=4, stream=True, **rid("t-stream")
        )
        streamed = "".join(c.choices[0].text for c in stream if c.choices)
        with sqlite3.connect(home / "mlx-manager.db") as db:
            db.row_factory = sqlite3.Row
            server.wait_for(
                lambda: db.execute("SELECT count(*) FROM requests").fetchone()[0] == 3,
                what="rows written",
            )
            stored = {
                r["request_id"]: r
                for r in db.execute("SELECT request_id, prompt, completion FROM requests")
            }
        assert json.loads(stored["t-content"]["prompt"]) == HELLO
        assert stored["t-content"]["completion"] == answer.choices[0].message.content
        assert (stored["t-stream"]["prompt"], stored["t-stream"]["completion"]) == (
            "once upon",
            streamed,
        )
        with_content = rows(server, limit=1)[0]
        assert with_content["request_id"] == "t-stream" and with_content["prompt"] == "once upon"
        for i in range(4):
            client.chat.completions.create(
                model="tiny-a", messages=HELLO, max_tokens=1, **rid(f"t-n{i}")
            )
        # At most 4 rows: the newest.
        server.wait_for(
            lambda: [r["request_id"] for r in rows(server)] == ["t-n3", "t-n2", "t-n1", "t-n0"],
            timeout=60,
            what="row-count pruning",
        )
        # keep_alive 0: unloaded as soon as the request ends, counted as an idle unload.
        client.chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=1, extra_body={"keep_alive": 0}
        )
        server.wait_for(lambda: server.worker("tiny-a") is None, what="tiny-a to unload")
        samples = scrape(server)
        assert value(samples, "mlx_manager_model_idle_unloads_total", model="tiny-a") == 1
        assert value(samples, "mlx_manager_model_evictions_total", model="tiny-a") == 0
        # MLX_MANAGER_LOG_FORMAT=json: each log line is a JSON object with the fields.
        lines = (home / "logs" / "mlx-manager.log").read_text().splitlines()
        entries = [json.loads(x) for x in lines]
        access = next(e for e in entries if e.get("id") == "t-content")
        assert access["logger"] == "mlx_manager.access" and access["status"] == 200
        assert access["model"] == "tiny-a"
        assert access["completion_tokens"] == answer.usage.completion_tokens
        assert "prompt" not in access  # content goes to the request log only
    finally:
        server.stop()


def test_a_model_loads_when_its_log_cannot_be_written(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True)
    (home / "logs" / "workers").write_text("a file where the worker logs' folder should be")
    server = start_server(home, models.env(home))
    try:
        answer = sdk(server).chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2)
        assert answer.choices[0].finish_reason in ("length", "stop")
        r = httpx.get(server.url + "/admin/logs/tiny-a")
        assert r.status_code == 404 and "No worker log" in r.json()["error"]["message"]
    finally:
        server.stop()
    assert "cannot write" in server.log.read_text()  # the worker said where its log went
