"""Ollama's API (/api/*) through the official `ollama` Python client, on real servers with the
tiny models: listing, show, ps, chat and generate streamed and not, options, format, think,
tools, pull from a fake hub, copy, create, delete, errors, keys, request log and metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.agent_model import (
    ASK_THINK,
    ASK_TWO,
    ASK_WEATHER,
    FINAL_ANSWER,
    THINK_ANSWER,
    THOUGHT,
    TOOLS,
)
from tests.conftest import Models, Server, start_server
from tests.fake_hub import FakeHub, repo_from_folder
from tests.test_observability import row, scrape, value

AGENT = "tiny-agent"
HELLO = [{"role": "user", "content": "hello world"}]
GREEDY = {"temperature": 0, "num_predict": 12}
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
TIMINGS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
# The tool loop's second turn as Ollama's clients send it: arguments as an object, the tool's
# name on its answer.
TOOL_LOOP = [
    *ASK_WEATHER,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny, 21C", "tool_name": "get_weather"},
]


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, headers=server.headers, timeout=120)


def error_of(e: pytest.ExceptionInfo[ollama.ResponseError]) -> tuple[int, str]:
    return e.value.status_code, e.value.error


def finished(reply: Any) -> None:
    """The fields every finished answer carries, as Ollama sends them."""
    assert reply.done is True and reply.done_reason in ("stop", "length")
    assert CREATED_AT.match(reply.created_at), reply.created_at
    for name in TIMINGS:
        assert isinstance(reply[name], int) and reply[name] >= 0, name
    assert reply.total_duration >= reply.eval_duration
    assert reply.prompt_eval_count > 0


def test_probes_and_version(server: Server) -> None:
    # Apps detect Ollama by these, without a key.
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.head(server.url + "/").status_code == 200
    r = httpx.get(server.url + "/api/version", headers=server.headers)
    assert r.status_code == 200 and re.match(r"^\d+\.\d+\.\d+$", r.json()["version"])


def test_tags_show_and_ps(client: ollama.Client) -> None:
    names = {m.model: m for m in client.list().models}
    assert "tiny-a:latest" in names and "tiny-agent:latest" in names
    a = names["tiny-a:latest"]
    assert a.size > 0 and len(a.digest) == 64 and a.details.format == "mlx"
    shown = client.show("tiny-a:latest")
    assert shown.details.family == "llama" and "completion" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelfile.startswith("# Modelfile") and "FROM " in shown.modelfile
    agent = client.show(AGENT)
    assert {"tools", "thinking"} <= set(agent.capabilities)
    client.chat(model="tiny-a", messages=HELLO, options=GREEDY)
    running = {m.model: m for m in client.ps().models}
    assert running["tiny-a:latest"].size > 0 and running["tiny-a:latest"].expires_at


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    reply = client.chat(model="tiny-a:latest", messages=HELLO, stream=False, options=GREEDY)
    finished(reply)
    assert reply.model == "tiny-a:latest" and reply.message.role == "assistant"
    assert 0 < reply.eval_count <= 12
    chunks = list(client.chat(model="tiny-a:latest", messages=HELLO, options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and len(chunks) >= 2
    finished(chunks[-1])
    # Put together, the stream is the whole answer (greedy: the same one).
    assert "".join(c.message.content for c in chunks) == reply.message.content
    assert chunks[-1].eval_count == reply.eval_count
    assert chunks[-1].prompt_eval_count == reply.prompt_eval_count


def test_streaming_is_ndjson_and_on_by_default(server: Server) -> None:
    body = {"model": "tiny-a", "messages": HELLO, "options": GREEDY}
    with httpx.stream(
        "POST", server.url + "/api/chat", json=body, headers=server.headers, timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])


def test_generate(client: ollama.Client) -> None:
    reply = client.generate(model="tiny-a", prompt="hello world", options=GREEDY)
    finished(reply)
    chunks = list(
        client.generate(model="tiny-a", prompt="hello world", options=GREEDY, stream=True)
    )
    assert "".join(c.response for c in chunks) == reply.response
    # A system prompt is part of the prompt; raw skips the template (and so its tokens).
    system = client.generate(
        model="tiny-a", prompt="hello world", system="Be brief.", options=GREEDY
    )
    assert system.prompt_eval_count > reply.prompt_eval_count
    raw = client.generate(model="tiny-a", prompt="hello world", raw=True, options=GREEDY)
    finished(raw)
    assert raw.prompt_eval_count < reply.prompt_eval_count


def test_options(client: ollama.Client) -> None:
    long = {"num_predict": 30, "stop": ["never-in-this-answer"]}
    short = client.generate(model="tiny-a", prompt="hi", options={"num_predict": 2})
    assert short.eval_count <= 2
    sampled = {
        "temperature": 1.0,
        "seed": 7,
        "top_k": 20,
        "top_p": 0.9,
        "min_p": 0.02,
        "repeat_penalty": 1.3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "num_predict": 16,
        "num_ctx": 1024,
        # Runner settings of Ollama's own: accepted and ignored.
        "num_gpu": 1,
        "num_thread": 4,
    }
    first = client.generate(model="tiny-a", prompt="hi", options=sampled)
    again = client.generate(model="tiny-a", prompt="hi", options=sampled)
    assert first.response == again.response  # the seed decides
    other = client.generate(model="tiny-a", prompt="hi", options={**sampled, "seed": 8})
    assert other.response != first.response or other.eval_count != first.eval_count
    # min_p 1 keeps only the likeliest token: sampling at temperature 1 is greedy decoding.
    greedy = client.generate(model="tiny-a", prompt="hi", options={"temperature": 0, **long})
    only_top = {"temperature": 1.0, "seed": 3, "min_p": 1.0, **long}
    assert client.generate(model="tiny-a", prompt="hi", options=only_top).response == (
        greedy.response
    )
    # A stop string ends the answer before it.
    text = greedy.response
    assert len(text) >= 12, text
    stop = text[8:12]
    cut = client.generate(
        model="tiny-a", prompt="hi", options={"temperature": 0, "num_predict": 30, "stop": stop}
    )
    assert cut.response == text[: text.index(stop)] and cut.done_reason == "stop"
    # A random model's greedy answer repeats itself; repeat_penalty changes it.
    penalised = {"temperature": 0, "repeat_penalty": 10.0, **long}
    assert client.generate(model="tiny-a", prompt="hi", options=penalised).response != (
        greedy.response
    )
    # num_ctx caps the context: a prompt beyond it is refused.
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny-a", prompt="hello world " * 20, options={"num_ctx": 8})
    assert e.value.status_code == 400


def test_format(client: ollama.Client) -> None:
    made = 0
    for seed in range(4):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 200}
        reply = client.chat(model="tiny-a", messages=HELLO, format="json", options=options)
        text = reply.message.content
        assert text.startswith("{"), text
        if reply.done_reason == "stop":
            assert isinstance(json.loads(text), dict)
            made += 1
    assert made >= 1
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = client.chat(
        model="tiny-a",
        messages=HELLO,
        format=schema,
        options={"temperature": 0, "num_predict": 50},
    )
    if reply.done_reason == "stop":
        assert isinstance(json.loads(reply.message.content)["ok"], bool)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny-a", messages=HELLO, format={"type": "nonsense"})
    assert e.value.status_code == 400


def test_think(client: ollama.Client) -> None:
    reply = client.chat(model=AGENT, messages=ASK_THINK, think=True, options={"temperature": 0})
    assert (reply.message.thinking, reply.message.content) == (THOUGHT, THINK_ANSWER)
    chunks = list(
        client.chat(
            model=AGENT, messages=ASK_THINK, think=True, options={"temperature": 0}, stream=True
        )
    )
    assert "".join(c.message.thinking or "" for c in chunks) == THOUGHT
    assert "".join(c.message.content for c in chunks) == THINK_ANSWER
    off = client.chat(model=AGENT, messages=ASK_THINK, think=False, options={"temperature": 0})
    assert off.message.content == THINK_ANSWER and not off.message.thinking
    # A level, as gpt-oss takes it, is a budget: this thought fits in "low"'s.
    low = client.generate(
        model=AGENT, prompt=ASK_THINK[0]["content"], think="low", options={"temperature": 0}
    )
    assert low.thinking == THOUGHT and low.response == THINK_ANSWER


def test_tools(client: ollama.Client) -> None:
    greedy = {"temperature": 0, "num_predict": 80}
    reply = client.chat(model=AGENT, messages=ASK_WEATHER, tools=TOOLS, options=greedy)
    assert reply.done_reason == "stop" and reply.message.content == ""
    (call,) = reply.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Paris"})
    chunks = list(
        client.chat(model=AGENT, messages=ASK_TWO, tools=TOOLS, options=greedy, stream=True)
    )
    calls = [c.function for chunk in chunks for c in chunk.message.tool_calls or []]
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    # The loop's next turn: the call and the tool's answer go back, the model answers.
    final = client.chat(model=AGENT, messages=TOOL_LOOP, tools=TOOLS, options=greedy)
    assert final.message.content == FINAL_ANSWER and not final.message.tool_calls


def test_load_and_unload_without_messages(client: ollama.Client, server: Server) -> None:
    loaded = client.chat(model="tiny-b", messages=[])
    assert loaded.done and loaded.done_reason == "load"
    assert server.worker("tiny-b")["state"] == "ready"
    gone = client.generate(model="tiny-b", prompt="", keep_alive=0)
    assert gone.done and gone.done_reason == "unload"
    server.wait_for(lambda: server.worker("tiny-b") is None, what="tiny-b unloaded")
    # keep_alive 0 on a real request: the model goes once it has answered.
    assert client.chat(model="tiny-b", messages=HELLO, options=GREEDY, keep_alive=0).done
    server.wait_for(lambda: server.worker("tiny-b") is None, what="tiny-b unloaded again")


def test_errors(client: ollama.Client, server: Server) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=HELLO)
    status, message = error_of(e)
    assert status == 404 and "no-such-model" in message
    with pytest.raises(ollama.ResponseError) as e:
        client.show("no-such-model")
    assert e.value.status_code == 404
    bad: list[tuple[dict[str, Any], str]] = [
        ({"options": {"temperature": 5}}, "options.temperature"),
        ({"options": {"num_predict": 0}}, "options.num_predict"),
        ({"suffix": "end"}, "suffix"),
        ({"context": [1, 2, 3]}, "context"),
        ({"template": "{{ .Prompt }}"}, "template"),
        ({"images": ["aGk="]}, "images"),
        ({"keep_alive": "soon"}, "keep_alive"),
        ({"think": "very"}, "think"),
    ]
    for extra, field in bad:
        body = {"model": "tiny-a", "prompt": "hi", "stream": False, **extra}
        r = httpx.post(server.url + "/api/generate", json=body, headers=server.headers)
        assert r.status_code == 400, (extra, r.text)
        assert list(r.json()) == ["error"] and field in r.json()["error"], r.text
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "tiny-a", "messages": [{"role": "robot", "content": "x"}]},
        headers=server.headers,
    )
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]
    as_json = {**server.headers, "Content-Type": "application/json"}
    r = httpx.post(server.url + "/api/chat", content=b"{", headers=as_json)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    # A body not sent as JSON (what a web page can send without a CORS preflight) is refused.
    r = httpx.post(server.url + "/api/chat", content=b"{}", headers=server.headers)
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
    r = httpx.post(server.url + "/api/show", json={}, headers=server.headers)
    assert r.status_code == 400 and "model" in r.json()["error"]
    # A bad embedding input, and unknown paths, in Ollama's shape too.
    embed = {"model": "tiny-a", "input": ["x", 3]}
    r = httpx.post(server.url + "/api/embed", json=embed, headers=server.headers)
    assert r.status_code == 400 and "input" in r.json()["error"], r.text
    r = httpx.get(server.url + "/api/nothing", headers=server.headers)
    assert r.status_code == 404 and list(r.json()) == ["error"]


def test_copy_create_and_delete(client: ollama.Client) -> None:
    assert client.copy("tiny-a:latest", "my-copy").status == "success"
    assert "my-copy:latest" in {m.model for m in client.list().models}
    reply = client.chat(model="my-copy:latest", messages=HELLO, options=GREEDY)
    assert reply.done
    statuses = list(
        client.create(
            model="helper",
            from_="tiny-a",
            system="You are terse.",
            parameters={"temperature": 0.2, "num_ctx": 512, "num_predict": 9},
            stream=True,
        )
    )
    assert statuses[-1].status == "success"
    shown = client.show("helper")
    assert 'SYSTEM """You are terse."""' in shown.modelfile
    assert "temperature 0.2" in shown.parameters
    assert "PARAMETER num_ctx 512" in shown.modelfile and shown.details.parent_model == "tiny-a"
    assert client.generate(model="helper", prompt="hi").eval_count <= 9
    # Created again: the profile changes.
    assert client.create(model="helper", from_="tiny-a", system="Now chatty.").status == "success"
    assert 'SYSTEM """Now chatty."""' in client.show("helper").modelfile
    # A copy of a profile keeps its defaults.
    client.copy("helper", "helper-2")
    assert 'SYSTEM """Now chatty."""' in client.show("helper-2").modelfile
    for refused, word in (
        ({"quantize": "q4_K_M"}, "quantize"),
        ({"files": {"model.gguf": "sha256:00"}}, "files"),
        ({"adapters": {"a.safetensors": "sha256:00"}}, "adapters"),
        ({"parameters": {"mirostat": 1}}, "mirostat"),
    ):
        with pytest.raises(ollama.ResponseError) as e:
            client.create(model="nope", from_="tiny-a", **refused)
        assert e.value.status_code == 400 and word in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="nope")
    assert e.value.status_code == 400 and "from" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("no-such-model", "x")
    assert e.value.status_code == 404
    for name in ("my-copy:latest", "helper", "helper-2"):
        assert client.delete(name).status == "success"
    names = {m.model for m in client.list().models}
    assert not names & {"my-copy:latest", "helper:latest", "helper-2:latest"}
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("helper")
    assert e.value.status_code == 404


# Pull and delete from a fake hub ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(models: Models) -> Iterator[FakeHub]:
    hub = FakeHub().start()
    hub.add(repo_from_folder("mlx-community/tiny-pulled", models.path("tiny-c")))
    yield hub
    hub.stop()


def test_pull_and_delete(models: Models, hub: FakeHub, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        **models.env(home),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
    }
    srv = start_server(home, env)
    try:
        client = ollama.Client(host=srv.url, headers=srv.headers, timeout=120)
        lines = list(client.pull("mlx-community/tiny-pulled:latest", stream=True))
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        layers = [x for x in lines if x.digest]
        assert layers and all(x.digest.startswith("sha256:") for x in layers)
        assert layers[-1].total > 0 and layers[-1].completed == layers[-1].total
        assert "mlx-community/tiny-pulled:latest" in {m.model for m in client.list().models}
        assert client.generate(model="mlx-community/tiny-pulled", prompt="hi", options=GREEDY).done
        # Pulled again (not streamed): already there.
        assert client.pull("mlx-community/tiny-pulled").status == "success"
        with pytest.raises(ollama.ResponseError):
            list(client.pull("mlx-community/not-there", stream=True))
        assert client.delete("mlx-community/tiny-pulled").status == "success"
        assert "mlx-community/tiny-pulled:latest" not in {m.model for m in client.list().models}
        # A model in a models folder is not the hub's to delete.
        with pytest.raises(ollama.ResponseError) as e:
            client.delete("tiny-a")
        assert e.value.status_code == 400
    finally:
        srv.stop()


# Keys, the request log and metrics ----------------------------------------------------------------


def test_keys_request_log_and_metrics(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = "an-ollama-test-key-long-enough"
    srv = start_server(home, models.env(home, api_key=key))
    try:
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=srv.url).list()
        assert e.value.status_code == 401
        r = httpx.post(srv.url + "/api/chat", json={"model": "tiny-a", "messages": HELLO})
        assert r.status_code == 401 and list(r.json()) == ["error"]
        # The probes still answer: they carry no data.
        assert httpx.head(srv.url + "/").status_code == 200
        assert httpx.get(srv.url + "/api/version").status_code == 200
        for method, path in (("GET", "/api/tags"), ("POST", "/api/show"), ("GET", "/api/ps")):
            r = httpx.request(method, srv.url + path, json={"model": "tiny-a"})
            assert r.status_code == 401 and list(r.json()) == ["error"], path
        auth = {"Authorization": f"Bearer {key}"}
        before = scrape(srv, auth)
        client = ollama.Client(host=srv.url, headers={**auth, "x-request-id": "oll-chat"})
        reply = client.chat(model="tiny-a", messages=HELLO, options=GREEDY)
        streamer = ollama.Client(host=srv.url, headers={**auth, "x-request-id": "oll-gen"})
        last = list(streamer.generate(model="tiny-a", prompt="hi", options=GREEDY, stream=True))[-1]
        srv_headers = srv.headers
        for rid, endpoint, stream, answer in (
            ("oll-chat", "/api/chat", 0, reply),
            ("oll-gen", "/api/generate", 1, last),
        ):
            r = row(srv, rid)
            assert (r["endpoint"], r["status"], r["stream"], r["model"]) == (
                endpoint,
                200,
                stream,
                "tiny-a",
            )
            assert r["key_name"] and r["ttft_ms"] is not None
            assert (r["prompt_tokens"], r["completion_tokens"]) == (
                answer.prompt_eval_count,
                answer.eval_count,
            )
        after = scrape(srv, srv_headers)
        for endpoint in ("/api/chat", "/api/generate"):
            labels = {"model": "tiny-a", "endpoint": endpoint, "status": "200"}
            name = "mlx_manager_requests_total"
            assert value(after, name, **labels) - value(before, name, **labels) == 1
    finally:
        srv.stop()


# The bodies, without a server ------------------------------------------------------------------


def test_names_and_options_map_onto_the_neutral_request() -> None:
    from gateway.http.ollama_schema import ChatRequest, CreateBody, GenerateBody, model_name

    assert model_name("tiny-a:latest") == "tiny-a" and model_name("llama:8b") == "llama:8b"
    body = ChatRequest.model_validate(
        {
            "model": "org/m:latest",
            "messages": TOOL_LOOP,
            "tools": TOOLS,
            "think": "medium",
            "keep_alive": "5m",
            "options": {"num_predict": -1, "stop": "x", "repeat_penalty": 1, "num_ctx": 64},
        }
    )
    request = body.generate_request()
    (choice,) = request.choices
    assert request.model == "org/m" and request.stream is True and request.keep_alive == 300
    assert (choice.max_tokens, choice.stop, choice.repetition_penalty) == (None, ["x"], None)
    assert (choice.context_length, choice.thinking, choice.reasoning_budget) == (64, True, 4096)
    assert choice.tool_choice == "auto" and choice.tool_grammar
    assert choice.messages is not None
    call = choice.messages[1]["tool_calls"][0]["function"]
    assert call == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert choice.messages[2] == {"role": "tool", "content": "sunny, 21C", "name": "get_weather"}
    raw = GenerateBody.model_validate(
        {"model": "m", "prompt": "<s>hi", "raw": True, "system": "ignored", "format": "json"}
    ).generate_request()
    assert raw.choices[0].kind == "completion" and raw.choices[0].prompt == "<s>hi"
    assert raw.choices[0].grammar
    plain = GenerateBody.model_validate({"model": "m", "prompt": "hi", "system": "S"})
    assert plain.generate_request().choices[0].messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
    ]
    made = CreateBody.model_validate(
        {"model": "x", "from": "m", "system": "S", "parameters": {"num_ctx": 512}}
    )
    assert made.refused() is None
    assert made.profile_fields() == {"context_length": 512, "system_prompt": "S"}


def test_a_client_that_leaves_stops_the_generation(server: Server) -> None:
    """Closing an NDJSON stream cancels the generation: its row says 499, with the tokens it
    made, far fewer than asked for."""
    body = {
        "model": "tiny-big",
        "prompt": "hi",
        "options": {"temperature": 1.0, "seed": 1, "num_predict": 4000},
    }
    headers = {**server.headers, "x-request-id": "oll-leaves"}
    with httpx.stream(
        "POST", server.url + "/api/generate", json=body, headers=headers, timeout=120
    ) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))
        assert first["done"] is False
    found = row(server, "oll-leaves")
    assert found["status"] == 499 and found["completion_tokens"] < 4000
