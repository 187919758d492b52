"""Fuzz the /v1 and Ollama's /api endpoints from the server's own /openapi.json (schemathesis
generates valid and invalid requests from it): no 5xx, every error in its protocol's shape
(OpenAI's, Anthropic's under /v1/messages, Ollama's under /api), every stream ended, no worker
crash, and the server still answers afterwards.

Half of the generated bodies name a real model, so valid requests reach a worker. The run is
deterministic (hypothesis `derandomize`) so that CI is repeatable; set MLX_MANAGER_FUZZ_EXAMPLES
to explore further with random examples."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.conftest import Models
from tests.server import Server, start_server

OPERATIONS = [
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
    ("/v1/responses", "POST"),
    ("/v1/messages", "POST"),
    ("/v1/messages/count_tokens", "POST"),
    ("/v1/models/{model_id}", "GET"),
    ("/v1/models", "GET"),
    ("/api/chat", "POST"),
    ("/api/generate", "POST"),
    ("/api/embed", "POST"),
    ("/api/show", "POST"),
]
EXAMPLES = int(os.environ.get("MLX_MANAGER_FUZZ_EXAMPLES", "0"))


@pytest.fixture(scope="module")
def fuzzed(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("fuzz") / "home"
    # Valid requests may ask for n=16 choices of the whole context: keep each one short.
    env = models.env(home, max_tokens_limit="24")
    server = start_server(home, env)
    yield server
    server.stop()


def _check(response: Any, case: Any) -> None:
    assert response.status_code < 500, "a server error"
    if case.path.startswith("/api/"):
        _check_ollama(response, case)
    elif response.status_code >= 400:
        body = response.json()
        if case.path.startswith("/v1/messages"):
            assert body["type"] == "error", "not Anthropic's error shape"
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], "no error message"
        assert isinstance(error["type"], str), "no error type"
    elif case.path.endswith("completions"):
        if "text/event-stream" in str(response.headers.get("content-type")):  # a list here
            last = [line for line in response.text.splitlines() if line.startswith("data:")][-1]
            # schemathesis stops reading a stream after a number of events (stream_cut_short).
            ended = last == "data: [DONE]" or '"error"' in last or response.stream_cut_short
            assert ended, "a stream without an end"
        else:
            assert response.json()["choices"], "no choices"


def _check_ollama(response: Any, case: Any) -> None:
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error, str) and error, "not Ollama's error shape"
    elif "ndjson" in str(response.headers.get("content-type")):
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert lines and (lines[-1].get("done") or "error" in lines[-1]), "a stream without an end"
    elif case.path in ("/api/chat", "/api/generate"):
        assert response.json()["done"] is True, "an answer not done"


def _describe(case: Any, response: Any) -> str:
    body = json.dumps(case.body, default=str)[:2000] if case.body is not None else ""
    return (
        f"{case.method} {case.formatted_path} {case.path_parameters} {body}\n"
        f"-> {response.status_code} {response.headers.get('content-type')} {response.text[:500]}"
    )


def test_fuzz_v1(fuzzed: Server) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    cases = st.one_of(
        *(
            schema[path][method].as_strategy(mode)
            for path, method in OPERATIONS
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        )
    )
    seen: dict[int, int] = {}
    ollama_ok: list[str] = []  # /api requests answered 200
    took: list[float] = []
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES or 400,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, model=st.sampled_from(["tiny-a", "tiny-org/tiny-hf", None]))
    def run(case: Any, model: str | None) -> None:
        if model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
            # A random keep_alive unloads the model after the request, and every next request
            # would pay for a load; the lifecycle tests cover keep_alive.
            case.body.pop("keep_alive", None)
        started = time.perf_counter()
        response = case.call(base_url=fuzzed.url, timeout=120)
        took.append(time.perf_counter() - started)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if case.path.startswith("/api/") and response.status_code == 200:
            ollama_ok.append(case.path)
        try:
            _check(response, case)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            # Collected rather than raised: shrinking would replay slow generations for minutes.
            failures.append(f"{type(e).__name__}: {e}\n{_describe(case, response)}")

    began = time.perf_counter()
    run()
    print(
        f"statuses: {dict(sorted(seen.items()))}; {len(took)} requests in "
        f"{time.perf_counter() - began:.0f} s, {sum(took):.0f} s of them in requests"
    )
    assert not failures, f"{len(failures)} bad responses; the first:\n" + failures[0]
    assert seen.get(200, 0) >= 20, seen  # the fuzz reached the models, not only validation
    assert {"/api/chat", "/api/generate", "/api/embed"} <= set(ollama_ok), ollama_ok
    assert sum(n for s, n in seen.items() if 400 <= s < 500) >= 20, seen

    # Nothing crashed, and the server still serves.
    workers = httpx.get(fuzzed.url + "/admin/workers", timeout=30).json()["data"]
    assert all(w["crashes"] == 0 and w["state"] != "failed" for w in workers), workers
    log = fuzzed.log.read_text()
    assert "Traceback" not in log and "exited unexpectedly" not in log, log[-3000:]
    r = httpx.post(
        fuzzed.v1 + "/chat/completions",
        json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
