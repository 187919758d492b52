"""The /v1 API through the official openai SDK and httpx, against the real server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import HF_MODEL, Server

HELLO = [{"role": "user", "content": "hello world"}]


def chat(client: openai.OpenAI, model: str = "tiny-a", **kw: Any) -> Any:
    kw.setdefault("messages", HELLO)
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=model, **kw)


def stream_chat(client: openai.OpenAI, model: str = "tiny-a", **kw: Any) -> tuple[str, Any, Any]:
    """(content, finish_reason, usage) of a streamed chat completion."""
    kw.setdefault("messages", HELLO)
    kw.setdefault("max_tokens", 16)
    parts, finish, usage = [], None, None
    with client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **kw
    ) as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
    return "".join(parts), finish, usage


def prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


# Models ---------------------------------------------------------------------------------------


def test_health(server: Server) -> None:
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_list_models_finds_folders_and_hf_cache(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"tiny-a", "tiny-b", "tiny-c", "broken", HF_MODEL} <= ids


def test_retrieve_model_with_slash(client: openai.OpenAI, server: Server) -> None:
    m = client.models.retrieve(HF_MODEL)
    assert m.id == HF_MODEL and m.owned_by == "tiny-org"
    raw = httpx.get(f"{server.v1}/models/{HF_MODEL}").json()
    assert raw["context_length"] == 2048 and isinstance(raw["loaded"], bool)


def test_retrieve_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("tiny-ax")
    assert e.value.code == "model_not_found"
    assert "tiny-a" in e.value.message  # close matches are offered


def test_hf_cache_model_answers(client: openai.OpenAI) -> None:
    r = chat(client, HF_MODEL, temperature=0)
    same = chat(client, "tiny-a", temperature=0)  # the same files under another name
    assert r.choices[0].message.content == same.choices[0].message.content


def test_models_marks_loaded(client: openai.OpenAI, server: Server) -> None:
    chat(client, "tiny-a", max_tokens=1)
    data = {m["id"]: m for m in httpx.get(server.v1 + "/models").json()["data"]}
    assert data["tiny-a"]["loaded"] is True
    assert data["broken"]["loaded"] is False


# Chat completions -----------------------------------------------------------------------------


def test_chat_basic_usage_and_length(client: openai.OpenAI, tokenizer_of: Any) -> None:
    r = chat(client, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny-a"
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer_of("tiny-a"), HELLO)
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_system_and_multi_turn_messages_reach_the_template(
    client: openai.OpenAI, tokenizer_of: Any
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": [{"type": "text", "text": "three"}]},
    ]
    r = chat(client, messages=messages, max_tokens=2)
    flat = [*messages[:-1], {"role": "user", "content": "three"}]  # text parts are joined
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer_of("tiny-a"), flat)


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    r = chat(client, max_tokens=20, temperature=0)
    content, finish, usage = stream_chat(client, max_tokens=20, temperature=0)
    assert content == r.choices[0].message.content
    assert finish == r.choices[0].finish_reason
    assert usage.model_dump() == r.usage.model_dump()


def test_stream_chunks_are_sse_and_end_with_done(server: Server) -> None:
    body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in first  # only with stream_options.include_usage


def test_max_completion_tokens(client: openai.OpenAI) -> None:
    r = chat(client, max_tokens=None, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 3


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    a = chat(client, temperature=0, max_tokens=24).choices[0].message.content
    b = chat(client, temperature=0, max_tokens=24).choices[0].message.content
    assert a == b


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        return chat(client, temperature=1.0, seed=seed, max_tokens=24).choices[0].message.content

    assert run(7) == run(7)
    assert len({run(s) for s in (1, 2, 3, 7)}) > 1


def test_top_p_restricts_to_greedy_when_tiny(client: openai.OpenAI) -> None:
    greedy = chat(client, temperature=0, max_tokens=16).choices[0].message.content
    nucleus = chat(client, temperature=1, top_p=1e-6, seed=3, max_tokens=16)
    assert nucleus.choices[0].message.content == greedy


def test_models_are_routed_by_name(client: openai.OpenAI) -> None:
    a = chat(client, "tiny-a", temperature=0, max_tokens=24).choices[0].message.content
    b = chat(client, "tiny-b", temperature=0, max_tokens=24).choices[0].message.content
    assert a != b


def _stop_case(client: openai.OpenAI) -> tuple[str, str]:
    """A greedy answer and a stop string taken from its middle."""
    full = chat(client, temperature=0, max_tokens=40).choices[0].message.content
    assert len(full) > 10, full
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    return full[: full.index(stop)], stop


def test_stop_string_is_not_emitted(client: openai.OpenAI) -> None:
    expected, stop = _stop_case(client)
    r = chat(client, temperature=0, max_tokens=40, stop=["\x00never", stop])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    content, finish, _ = stream_chat(client, temperature=0, max_tokens=40, stop=stop)
    assert content == expected and finish == "stop"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the top token
    with client.chat.completions.create(
        model="tiny-a",
        messages=HELLO,
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ) as stream:
        streamed = [
            e for ch in stream for c in ch.choices if c.logprobs for e in c.logprobs.content
        ]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_n_choices(client: openai.OpenAI) -> None:
    # Choice i of a seeded request is sampled with seed + i: the same as asking for it alone.
    r = chat(client, n=2, temperature=1, seed=5, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1]
    alone = [chat(client, temperature=1, seed=s, max_tokens=8) for s in (5, 6)]
    assert [c.message.content for c in r.choices] == [a.choices[0].message.content for a in alone]
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens  # counted once, not per choice


def test_profile_free_defaults_follow_openai(client: openai.OpenAI) -> None:
    # No temperature given: OpenAI's default (1.0) samples, so two runs without a seed differ.
    outs = {chat(client, max_tokens=24).choices[0].message.content for _ in range(3)}
    assert len(outs) > 1


# Completions ----------------------------------------------------------------------------------


def test_completions_string_and_list(client: openai.OpenAI, tokenizer_of: Any) -> None:
    r = client.completions.create(
        model="tiny-b", prompt="the quick brown", max_tokens=6, temperature=0
    )
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.prompt_tokens == len(tokenizer_of("tiny-b").encode("the quick brown"))
    many = client.completions.create(
        model="tiny-b", prompt=["the quick brown", "hello"], max_tokens=6, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == r.choices[0].text
    tok = tokenizer_of("tiny-b")
    assert many.usage.prompt_tokens == len(tok.encode("the quick brown")) + len(tok.encode("hello"))


def test_completions_stream_and_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny-b", prompt="hello", max_tokens=6, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs)
    text, usage = [], None
    for chunk in client.completions.create(
        model="tiny-b",
        prompt="hello",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        text += [c.text for c in chunk.choices]
    assert "".join(text) == r.choices[0].text
    assert usage.completion_tokens == r.usage.completion_tokens


def test_completions_stop(client: openai.OpenAI) -> None:
    full = (
        client.completions.create(model="tiny-b", prompt="hello", max_tokens=40, temperature=0)
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.completions.create(
        model="tiny-b", prompt="hello", max_tokens=40, temperature=0, stop=stop
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


# Errors ---------------------------------------------------------------------------------------


def _post(server: Server, path: str, content: bytes | str) -> httpx.Response:
    return httpx.post(
        server.v1 + path, content=content, timeout=30, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": HELLO}, "model", "Missing required parameter"),
        ({"model": "tiny-a"}, "messages", "Missing required parameter"),
        ({"model": "tiny-a", "messages": []}, "messages", "at least 1"),
        (
            {"model": "tiny-a", "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
            "Invalid value",
        ),
        ({"model": "tiny-a", "messages": HELLO, "temperature": 3}, "temperature", "2"),
        ({"model": "tiny-a", "messages": HELLO, "max_tokens": 0}, "max_tokens", "1"),
        ({"model": "tiny-a", "messages": HELLO, "top_logprobs": 50}, "top_logprobs", "20"),
        ({"model": "tiny-a", "messages": HELLO, "stop": 5}, "stop", "Invalid value"),
        ({"model": 5, "messages": HELLO}, "model", "Invalid value"),
    ],
)
def test_invalid_fields_name_the_field(
    server: Server, body: dict, param: str, fragment: str
) -> None:
    r = _post(server, "/chat/completions", json.dumps(body))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert fragment in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", '"text"'])
def test_malformed_json(server: Server, raw: bytes | str) -> None:
    r = _post(server, "/chat/completions", raw)
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_completion_prompt_validation(server: Server) -> None:
    r = _post(server, "/completions", json.dumps({"model": "tiny-a"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_unknown_model_404_with_suggestions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "tiny_a")
    assert e.value.code == "model_not_found"
    assert "'tiny-a'" in e.value.message


def test_prompt_longer_than_context(client: openai.OpenAI) -> None:
    long = " ".join(["quick brown fox"] * 2000)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=[{"role": "user", "content": long}])
    assert e.value.code == "context_length_exceeded"
    assert "2048" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-a", prompt=long, stream=True)


def test_model_that_fails_to_load_gives_503_and_others_carry_on(
    client: openai.OpenAI, server: Server
) -> None:
    for _ in range(2):  # each request tries a fresh worker
        with pytest.raises(openai.InternalServerError) as e:
            chat(client, "broken")
        assert e.value.status_code == 503
        assert "broken" in e.value.message and "failed to load" in e.value.message
    assert chat(client, "tiny-a", max_tokens=2).choices[0].message.content is not None
    w = server.worker("broken")  # listed as failed, with the reason, never as loaded
    assert w["state"] == "failed" and "failed to load" in w["error"] and w["pid"] is None


def test_unknown_route_and_method_are_json(server: Server) -> None:
    r = httpx.get(server.v1 + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.v1 + "/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_ignores_unknown_fields(client: openai.OpenAI) -> None:
    r = chat(client, max_tokens=2, extra_body={"some_vendor_field": {"x": 1}})
    assert r.choices[0].finish_reason in ("length", "stop")


# Concurrency ----------------------------------------------------------------------------------


def test_eight_concurrent_streams_over_two_models(
    aclient: openai.AsyncOpenAI, tokenizer_of: Any
) -> None:
    async def one(i: int) -> tuple[str, Any, Any]:
        model = ("tiny-a", "tiny-b")[i % 2]
        messages = [{"role": "user", "content": f"request number {i}"}]
        stream = await aclient.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=24,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish, usage = None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                finish = c.finish_reason or finish
        return model, (messages, finish), usage

    async def main() -> list[Any]:
        return await asyncio.gather(*(one(i) for i in range(8)))

    results = asyncio.run(main())
    assert len(results) == 8
    for model, (messages, finish), usage in results:
        assert finish in ("length", "stop")
        assert usage.prompt_tokens == prompt_tokens(tokenizer_of(model), messages)
        if finish == "length":
            assert usage.completion_tokens == 24
        else:
            assert 1 <= usage.completion_tokens <= 24


def test_concurrent_first_requests_load_once(aclient: openai.AsyncOpenAI, server: Server) -> None:
    assert server.worker("tiny-c") is None

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(
                aclient.chat.completions.create(model="tiny-c", messages=HELLO, max_tokens=4)
                for _ in range(12)
            )
        )

    results = asyncio.run(main())
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)
    w = server.worker("tiny-c")
    assert w["loads"] == 1 and w["requests_served"] == 12 and w["state"] == "ready"


def test_logit_bias(client: openai.OpenAI, tokenizer_of: Any) -> None:
    # +100 on one token makes greedy decoding pick it every time.
    r = chat(client, temperature=0, max_tokens=5, logit_bias={"100": 100})
    assert r.choices[0].message.content == tokenizer_of("tiny-a").decode([100] * 5)
    assert r.usage.completion_tokens == 5


@pytest.mark.parametrize(
    ("bias", "fragment"),
    [({"x": 1}, "token ids"), ({"5": 101}, "100"), ({"99999": -100}, "outside")],
)
def test_logit_bias_errors(server: Server, bias: dict, fragment: str) -> None:
    body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 2, "logit_bias": bias}
    r = _post(server, "/chat/completions", json.dumps(body))
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
