"""The prompt cache: a chat's next turn reuses the KV cache of the history it resends, reports
it as usage.prompt_tokens_details.cached_tokens, answers as it would without it, and stays
within its byte bound."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.conftest import Models, Server
from tests.server import start_server


def turn(
    client: openai.OpenAI, messages: list[dict[str, str]], model: str = "tiny-b"
) -> tuple[str, int, int]:
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    usage = reply.usage
    return (
        reply.choices[0].message.content,
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens,
    )


def test_a_second_turn_reuses_the_first(client: openai.OpenAI, server: Server) -> None:
    history = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
    text, prompt1, cached1 = turn(client, history)
    history += [
        {"role": "assistant", "content": text},
        {"role": "user", "content": "red green blue"},
    ]
    answer, prompt2, cached2 = turn(client, history)
    assert prompt2 > prompt1
    # At least the first turn's prompt is reused (its answer too, when it tokenizes the same).
    assert prompt1 <= cached2 < prompt2, (prompt1, cached2, prompt2)
    # All of it again: the whole prompt but its last token, and the same answer.
    again, _, cached3 = turn(client, history)
    assert cached3 == prompt2 - 1 and again == answer
    # Streams report it too.
    chunks = list(
        client.chat.completions.create(
            model="tiny-b",
            messages=history,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == prompt2 - 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer


def test_the_cache_is_bounded(models: Models, tmp_path: Path) -> None:
    """A bound smaller than any one entry keeps nothing (each token of this model's KV cache
    takes 512 bytes); 0 turns the cache off."""
    for size in ("1KiB", "0"):
        server = start_server(tmp_path / size, models.env(tmp_path / size, prompt_cache_bytes=size))
        try:
            client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
            messages = [{"role": "user", "content": "hello world"}]
            first = turn(client, messages)
            second = turn(client, messages)
            assert first[2] == second[2] == 0 and first[0] == second[0]
        finally:
            server.stop()
