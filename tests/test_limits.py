"""Request limits on a real server: each one refused with a 4xx that names the limit and its
setting, through the OpenAI SDK, raw HTTP and MCP alike."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import NO_EOS, Models
from tests.server import Server, start_server
from tests.test_cli import as_json

HELLO = [{"role": "user", "content": "hello world"}]
TOKENS_LIMIT = 1500


@pytest.fixture(scope="module")
def limited(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("limits") / "home"
    env = models.env(
        home,
        max_body_bytes="64KiB",
        max_tokens_limit=str(TOKENS_LIMIT),
        max_messages="5",
        max_prompt_chars="2000",
        max_concurrent_per_key="2",
    )
    keys = {name: as_json(env, "keys", "create", "--name", name)["key"] for name in ("k1", "k2")}
    server = start_server(home, env)
    server.keys = keys  # type: ignore[attr-defined]
    yield server
    server.stop()


def sdk(server: Server, key: str = "k1") -> openai.OpenAI:
    api_key = server.keys[key]  # type: ignore[attr-defined]
    return openai.OpenAI(base_url=server.v1, api_key=api_key, max_retries=0, timeout=120)


def refused(call: Any, status: int) -> dict[str, Any]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == status
    return e.value.body  # the "error" object


def test_max_tokens_limit(limited: Server) -> None:
    client = sdk(limited)
    err = refused(
        lambda: client.chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=TOKENS_LIMIT + 1
        ),
        400,
    )
    assert err["param"] == "max_tokens" and err["code"] == "max_tokens_too_large"
    assert str(TOKENS_LIMIT) in err["message"] and "MLX_MANAGER_MAX_TOKENS_LIMIT" in err["message"]
    # Within the limit: fine. With none given, generation stops at the limit, not at the end
    # of the context (2048 tokens for this model).
    ok = client.completions.create(model="tiny-a", prompt="hi", max_tokens=TOKENS_LIMIT, **NO_EOS)
    assert ok.usage.completion_tokens == TOKENS_LIMIT
    capped = client.completions.create(model="tiny-a", prompt="hi", **NO_EOS)
    assert capped.usage.completion_tokens == TOKENS_LIMIT
    assert capped.choices[0].finish_reason == "length"


def test_messages_and_prompt_length(limited: Server) -> None:
    client = sdk(limited)
    six = [{"role": "user", "content": f"m{i}"} for i in range(6)]
    err = refused(lambda: client.chat.completions.create(model="tiny-a", messages=six), 400)
    assert err["param"] == "messages" and err["code"] == "too_many_messages"
    assert "6 messages" in err["message"] and "at most 5" in err["message"]

    long_chat = [{"role": "user", "content": "x" * 2001}]
    err = refused(lambda: client.chat.completions.create(model="tiny-a", messages=long_chat), 400)
    assert err["param"] == "messages" and err["code"] == "prompt_too_long"
    assert "2,001 characters" in err["message"] and "MLX_MANAGER_MAX_PROMPT_CHARS" in err["message"]

    err = refused(lambda: client.completions.create(model="tiny-a", prompt="y" * 2001), 400)
    assert err["param"] == "prompt" and err["code"] == "prompt_too_long"
    # Several prompts: each is checked.
    err = refused(lambda: client.completions.create(model="tiny-a", prompt=["ok", "z" * 2001]), 400)
    assert err["code"] == "prompt_too_long"
    # Right at the limits: served.
    five = client.chat.completions.create(model="tiny-a", messages=six[:5], max_tokens=2)
    assert five.choices[0].message.content is not None


def test_body_size_cap(limited: Server) -> None:
    headers = {"Authorization": f"Bearer {limited.keys['k1']}"}  # type: ignore[attr-defined]
    body = json.dumps({"model": "tiny-a", "prompt": "a" * 70_000}).encode()
    r = httpx.post(limited.v1 + "/completions", content=body, headers=headers)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "at most 64.0 KiB" in err["message"]
    assert "MLX_MANAGER_MAX_BODY_BYTES" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes are counted as they come
        for _ in range(100):
            yield b" " * 1024

    r = httpx.post(limited.v1 + "/completions", content=chunks(), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # The server carries on.
    assert sdk(limited).completions.create(model="tiny-a", prompt="hi", max_tokens=2).usage


def test_concurrency_per_key(limited: Server) -> None:
    client = sdk(limited, "k1")
    streams = [
        client.chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=TOKENS_LIMIT, stream=True, **NO_EOS
        )
        for _ in range(2)
    ]
    try:
        for s in streams:
            next(iter(s))  # both are running
        err = refused(
            lambda: client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2),
            429,
        )
        assert err["code"] == "concurrency_limit" and "'k1'" in err["message"]
        # Another key is not held back by k1's requests, nor are non-generation routes.
        other = sdk(limited, "k2").chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=2
        )
        assert other.usage.completion_tokens >= 1
        assert client.models.list().data
    finally:
        for s in streams:
            s.close()

    def accepted() -> bool:
        try:
            client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2)
            return True
        except openai.RateLimitError:
            return False

    limited.wait_for(accepted, what="k1's closed streams to stop counting")


def test_mcp_chat_has_the_same_limits(limited: Server) -> None:
    async def main() -> Any:
        headers = {"Authorization": f"Bearer {limited.keys['k1']}"}  # type: ignore[attr-defined]
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            transport = streamable_http_client(limited.url + "/mcp", http_client=http)
            async with Client(transport, cache=None) as client:
                return await client.call_tool(
                    "chat", {"model": "tiny-a", "messages": HELLO, "max_tokens": TOKENS_LIMIT + 1}
                )

    result = asyncio.run(main())
    assert result.is_error
    assert "MLX_MANAGER_MAX_TOKENS_LIMIT" in result.content[0].text
