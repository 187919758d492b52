"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through the official
`anthropic` SDK, as Claude Code's users' tools call it, and as raw server-sent events: tool use,
thinking, tool loops on the overfit agent model (tests/agent_model.py), streams that equal the
whole answer, pings while a model loads, and every error in Anthropic's shape."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from config.settings import Settings
from gateway.catalog.builder import ModelSpec, build_model
from gateway.engine.request import GenerationRequest
from gateway.errors import InvalidRequest
from gateway.http.messages_schema import MessagesRequest
from gateway.service import limits
from tests.agent_model import (
    ASK_THINK,
    ASK_TWO,
    ASK_WEATHER,
    FINAL_ANSWER,
    THINK_ANSWER,
    THOUGHT,
    TOOL_RESULT,
    TOOLS,
    template_messages,
)
from tests.conftest import NO_EOS, Models
from tests.server import Server, start_server
from tests.test_cli import as_json
from tests.test_lifecycle import gone
from tests.test_observability import row, scrape, value

AGENT = "tiny-agent"
HELLO = [{"role": "user", "content": "hello world"}]
# The anthropic SDK no longer has sampling parameters; the API (and this server) still takes them.
GREEDY = {"temperature": 0}
# The scenarios' OpenAI tools as Anthropic's.
ANTH_TOOLS = [
    {
        "name": t["function"]["name"],
        **({"description": t["function"]["description"]} if "description" in t["function"] else {}),
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
# TOOL_RESULT (the tool loop's second turn) as an Anthropic conversation.
ANTH_TOOL_RESULT: list[dict[str, Any]] = [
    *ASK_WEATHER,
    {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Paris"}}
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "sunny, 21C"}],
    },
]


def sdk(server: Server, key: str = "unused", **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120, **kw)


@pytest.fixture()
def claude(server: Server) -> anthropic.Anthropic:
    return sdk(server)


def ask(
    client: anthropic.Anthropic, messages: list[dict[str, Any]], model: str = AGENT, **kw: Any
) -> Any:
    """A greedy answer (sampling parameters go in the body: the SDK has none)."""
    extra = {**GREEDY, **kw.pop("extra_body", {})}
    kw.setdefault("max_tokens", 80)
    return client.messages.create(model=model, messages=messages, extra_body=extra, **kw)


def streamed(
    client: anthropic.Anthropic, messages: list[dict[str, Any]], model: str = AGENT, **kw: Any
) -> Any:
    """The same, streamed and put together by the SDK's own accumulator."""
    extra = {**GREEDY, **kw.pop("extra_body", {})}
    kw.setdefault("max_tokens", 80)
    with client.messages.stream(model=model, messages=messages, extra_body=extra, **kw) as s:
        return s.get_final_message()


def blocks(message: Any) -> list[dict[str, Any]]:
    """Content blocks without their ids (fresh per request)."""
    return [
        {
            k: v
            for k, v in b.model_dump(exclude_none=True).items()
            if k not in ("id", "parsed_output")
        }
        for b in message.content
    ]


def same_answer(a: Any, b: Any, usage: bool = True) -> None:
    assert blocks(a) == blocks(b)
    assert (a.stop_reason, a.stop_sequence) == (b.stop_reason, b.stop_sequence)
    if usage:
        assert a.usage.model_dump(exclude_none=True) == b.usage.model_dump(exclude_none=True)
    else:  # the prompt cache may serve the second: the prompt's length is what is the same
        assert total_input(a) == total_input(b)
        assert a.usage.output_tokens == b.usage.output_tokens


def total_input(message: Any) -> int:
    u = message.usage
    return u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens


def sse(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    """A raw stream: its status and its events (type, data) as sent, pings included."""
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream(
        "POST", url + "/v1/messages", json={**body, "stream": True}, headers=headers, timeout=120
    ) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [("", r.json())]
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
                assert kind == data["type"], (kind, data)  # the event names its data's type
                events.append((kind, data))
                kind = None
    return 200, events


def check_sequence(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic's order: message_start; per block start, deltas, stop (indices from 0, in
    turn); message_delta; message_stop. Pings may come anywhere. Returns the events sans pings."""
    real = [e for e in events if e[0] != "ping"]
    kinds = [k for k, _ in real]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    index, open_block = -1, False
    for kind, data in real[1:-2]:
        if kind == "content_block_start":
            assert not open_block and data["index"] == index + 1
            index, open_block = index + 1, True
        else:
            assert kind in ("content_block_delta", "content_block_stop") and open_block, kind
            assert data["index"] == index
            open_block = kind == "content_block_delta"
    assert not open_block
    return real


def error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    """The body's `error`, checking the envelope is Anthropic's."""
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error", body
    return body["error"]


# Answers ----------------------------------------------------------------------------------------


def test_a_tool_call_streamed_and_not(claude: anthropic.Anthropic, server: Server) -> None:
    reply = ask(claude, ASK_WEATHER, tools=ANTH_TOOLS)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == AGENT
    assert reply.id.startswith("msg_")
    assert reply.stop_reason == "tool_use" and reply.stop_sequence is None
    (call,) = reply.content
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    assert reply.usage.output_tokens > 0 and reply.usage.cache_creation_input_tokens == 0

    same_answer(streamed(claude, ASK_WEATHER, tools=ANTH_TOOLS), reply, usage=False)
    # The raw events: the arguments stream as input_json_delta pieces as they are written.
    body = {"model": AGENT, "max_tokens": 80, "messages": ASK_WEATHER, "tools": ANTH_TOOLS}
    status, events = sse(server.url, {**body, **GREEDY})
    real = check_sequence(events)
    assert status == 200
    start = real[1][1]["content_block"]
    assert start["type"] == "tool_use" and start["input"] == {} and start["name"] == "get_weather"
    pieces = [d["delta"]["partial_json"] for k, d in real if k == "content_block_delta"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Paris"}
    assert all(
        d["delta"]["type"] == "input_json_delta" for k, d in real if k == "content_block_delta"
    )
    delta = real[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


def test_parallel_calls_and_disable_parallel_tool_use(claude: anthropic.Anthropic) -> None:
    reply = ask(claude, ASK_TWO, tools=ANTH_TOOLS)
    assert [(b.type, b.input["city"]) for b in reply.content] == [
        ("tool_use", "Paris"),
        ("tool_use", "Rome"),
    ]
    assert len({b.id for b in reply.content}) == 2
    same_answer(streamed(claude, ASK_TWO, tools=ANTH_TOOLS), reply, usage=False)
    choice = {"type": "auto", "disable_parallel_tool_use": True}
    one = ask(claude, ASK_TWO, tools=ANTH_TOOLS, tool_choice=choice)
    assert [b.input for b in one.content] == [{"city": "Paris"}]


def test_a_tool_loop(claude: anthropic.Anthropic) -> None:
    """tool_use -> tool_result -> the answer, passing the SDK's own content blocks back."""
    first = ask(claude, ASK_WEATHER, tools=ANTH_TOOLS)
    (call,) = first.content
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21C"}
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [result]},
    ]
    final = ask(claude, messages, tools=ANTH_TOOLS)
    assert [(b.type, b.text) for b in final.content] == [("text", FINAL_ANSWER)]
    assert final.stop_reason == "end_turn"
    same_answer(streamed(claude, messages, tools=ANTH_TOOLS), final, usage=False)
    # The result as text blocks, and earlier thinking in the assistant turn: the same prompt
    # for this template (it shows no reasoning), so the same answer.
    blocks_result = {**result, "content": [{"type": "text", "text": "sunny, 21C"}]}
    thought = [
        {"type": "thinking", "thinking": "Look it up.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "opaque"},
    ]
    again = [
        *ASK_WEATHER,
        {"role": "assistant", "content": [*thought, call.model_dump()]},
        {"role": "user", "content": [blocks_result]},
    ]
    assert ask(claude, again, tools=ANTH_TOOLS).content[0].text == FINAL_ANSWER


@pytest.mark.parametrize(
    ("anthropic_messages", "openai_messages", "tools"),
    [
        (ASK_WEATHER, ASK_WEATHER, True),
        (ANTH_TOOL_RESULT, TOOL_RESULT, True),
        (ASK_THINK, ASK_THINK, False),
    ],
)
def test_conversations_render_as_the_scenarios(
    tokenizer_of: Any,
    anthropic_messages: list[dict[str, Any]],
    openai_messages: list[dict[str, Any]],
    tools: bool,
) -> None:
    """The Anthropic conversation reaches the template as exactly the prompt the agent model
    was trained on from the OpenAI messages (tool_use -> tool_calls with a mapping, content ""
    rather than None; tool_result -> a `tool` message)."""
    tok = tokenizer_of(AGENT)
    body = {"model": AGENT, "max_tokens": 10, "messages": anthropic_messages}
    req = MessagesRequest.model_validate({**body, **({"tools": ANTH_TOOLS} if tools else {})})
    ours = req.generation_request()
    extra = {"tools": ours.tools} if tools else {}
    prompt = tok.apply_chat_template(
        ours.messages, add_generation_prompt=True, tokenize=False, **extra
    )
    theirs = tok.apply_chat_template(
        template_messages(openai_messages),
        add_generation_prompt=True,
        tokenize=False,
        **({"tools": TOOLS} if tools else {}),
    )
    assert prompt == theirs


def test_thinking_blocks(claude: anthropic.Anthropic, server: Server) -> None:
    reply = ask(claude, ASK_THINK)
    assert [b.model_dump(exclude_none=True) for b in reply.content] == [
        {"type": "thinking", "thinking": THOUGHT, "signature": ""},
        {"type": "text", "text": THINK_ANSWER},
    ]
    assert reply.stop_reason == "end_turn"
    same_answer(streamed(claude, ASK_THINK), reply, usage=False)
    # Thinking asked for (Claude Code's adaptive, or a budget): this model thinks anyway.
    for thinking in ({"type": "adaptive"}, {"type": "enabled", "budget_tokens": 2048}):
        assert blocks(ask(claude, ASK_THINK, thinking=thinking)) == blocks(reply)
    # Shown as omitted: the block stays, empty.
    hidden = ask(
        claude, ASK_THINK, extra_body={"thinking": {"type": "adaptive", "display": "omitted"}}
    )
    assert [(b.type, getattr(b, "thinking", None)) for b in hidden.content] == [
        ("thinking", ""),
        ("text", None),
    ]
    # Raw: thinking deltas, a signature_delta just before the thinking block stops, then text.
    body = {"model": AGENT, "max_tokens": 80, "messages": ASK_THINK, **GREEDY}
    real = check_sequence(sse(server.url, body)[1])
    kinds = [(k, d.get("delta", d.get("content_block", {})).get("type")) for k, d in real]
    stop = kinds.index(("content_block_stop", None))
    assert kinds[1] == ("content_block_start", "thinking")
    assert kinds[stop - 1] == ("content_block_delta", "signature_delta")
    assert {k for k in kinds[2 : stop - 1]} == {("content_block_delta", "thinking_delta")}
    assert kinds[stop + 1] == ("content_block_start", "text")


def test_tool_choice(claude: anthropic.Anthropic) -> None:
    # any: on a prompt the model answers with text, the answer is a call (and only calls).
    for stream in (False, True):
        go = streamed if stream else ask
        forced = go(claude, ASK_THINK, tools=ANTH_TOOLS, tool_choice={"type": "any"})
        assert forced.content and {b.type for b in forced.content} == {"tool_use"}
        assert forced.content[0].name in ("get_weather", "get_time")
        assert forced.stop_reason in ("tool_use", "max_tokens")
        # A named tool: only it is offered, so only it is called.
        named = {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}
        one = go(claude, ASK_WEATHER, tools=ANTH_TOOLS, tool_choice=named)
        assert [(b.type, b.name) for b in one.content] == [("tool_use", "get_time")]
        assert one.stop_reason == "tool_use"
    # none: no tools reach the template, nothing is a call.
    none = ask(claude, ASK_WEATHER, tools=ANTH_TOOLS, tool_choice={"type": "none"})
    assert none.stop_reason != "tool_use" and all(b.type != "tool_use" for b in none.content)


def test_stop_sequences(claude: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = {"tools": ANTH_TOOLS, "stop_sequences": ["nowhere", "sunny"]}
    reply = ask(claude, ANTH_TOOL_RESULT, **kw)
    assert [b.text for b in reply.content] == [FINAL_ANSWER.split("sunny")[0]]
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "sunny")
    same_answer(streamed(claude, ANTH_TOOL_RESULT, **kw), reply, usage=False)


def test_top_k_one_is_greedy(claude: anthropic.Anthropic) -> None:
    greedy = ask(claude, HELLO, model="tiny-a", max_tokens=12)
    top1 = ask(
        claude, HELLO, model="tiny-a", max_tokens=12, extra_body={"temperature": 1, "top_k": 1}
    )
    assert blocks(top1) == blocks(greedy)


def test_structured_output(claude: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    reply = ask(
        claude,
        HELLO,
        model="tiny-a",
        max_tokens=40,
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    (text,) = reply.content
    assert set(json.loads(text.text)) == {"ok"} and reply.stop_reason == "end_turn"


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    system = "Answer briefly."
    counted = claude.messages.count_tokens(
        model=AGENT, messages=ASK_WEATHER, tools=ANTH_TOOLS, system=system
    ).input_tokens
    reply = ask(claude, ASK_WEATHER, tools=ANTH_TOOLS, system=system)
    assert total_input(reply) == counted  # a warm prompt cache moves tokens to cache_read
    bare = claude.messages.count_tokens(model=AGENT, messages=ASK_WEATHER).input_tokens
    assert 0 < bare < counted  # the template shows the tools and the system prompt
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.count_tokens(model="no-such-model", messages=ASK_WEATHER)
    assert error_of(e.value)["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.count_tokens(model=AGENT, messages=[])
    assert error_of(e.value)["type"] == "invalid_request_error"


# Refusals ---------------------------------------------------------------------------------------


def refused(client: anthropic.Anthropic, **body: Any) -> dict[str, Any]:
    """A body the server must answer with 400, in Anthropic's shape."""
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(**{"model": AGENT, "max_tokens": 10, "messages": HELLO, **body})
    err = error_of(e.value)
    assert err["type"] == "invalid_request_error"
    return err


def test_bad_requests(claude: anthropic.Anthropic, server: Server) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=AGENT, messages=HELLO, max_tokens=None)  # type: ignore[arg-type]
    assert "max_tokens" in error_of(e.value)["message"]
    assert "max_tokens" in refused(claude, max_tokens=0)["message"]
    assert "messages" in refused(claude, messages=[])["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
    err = refused(
        claude, messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, image]}]
    )
    assert "'tiny-agent'" in err["message"] and "vision" in err["message"]
    assert "messages.0.content.1" in err["message"]
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    assert "vision" in refused(claude, messages=[{"role": "user", "content": [doc]}])["message"]
    err = refused(claude, messages=[{"role": "user", "content": [{"type": "video"}]}])
    assert "'video'" in err["message"] and "messages.0.content.0" in err["message"]
    err = refused(claude, messages=[{"role": "user", "content": [{"type": "tool_result"}]}])
    assert "messages.0.content.0.tool_use_id" in err["message"]
    misplaced = {"type": "tool_result", "tool_use_id": "t", "content": "x"}
    err = refused(claude, messages=[{"role": "assistant", "content": [misplaced]}])
    assert "user message" in err["message"]
    err = refused(claude, tools=ANTH_TOOLS, tool_choice={"type": "tool", "name": "nope"})
    assert "'nope'" in err["message"] and "get_weather" in err["message"]
    assert "needs tools" in refused(claude, tool_choice={"type": "any"})["message"]
    err = refused(claude, tools=[{"name": "f", "description": "no schema"}])
    assert "input_schema" in err["message"]
    err = refused(claude, thinking={"type": "enabled"})
    assert "budget_tokens" in err["message"]
    # Not JSON, and not sent as JSON.
    for content, kind in (("{bad", "application/json"), ('{"model": "x"}', "text/plain")):
        r = httpx.post(server.url + "/v1/messages", content=content, headers={"content-type": kind})
        assert r.status_code in (400, 415) and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    # Server tools and Anthropic's own client tools are left out, never refused.
    web = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    editor = {"type": "text_editor_20250124", "name": "str_replace_editor"}
    ok = ask(claude, ASK_WEATHER, tools=[*ANTH_TOOLS, web, editor])
    assert [b.input for b in ok.content] == [{"city": "Paris"}]


def test_unknown_model_is_404(claude: anthropic.Anthropic) -> None:
    for stream in (False, True):
        with pytest.raises(anthropic.NotFoundError) as e:
            go = streamed if stream else ask
            go(claude, HELLO, model="no-such-model")
        err = error_of(e.value)
        assert err["type"] == "not_found_error" and "no-such-model" in err["message"]


# Claude Code ------------------------------------------------------------------------------------

CLAUDE_WORDS = (
    "the a model answers questions about local machines memory tokens weights random hello "
    "world apple silicon gateway worker process batch stream cache profile load unload quick "
    "brown fox jumps over lazy dog one two three four five data server client request python"
).split()


def claude_code_body(model: str) -> dict[str, Any]:
    """A request shaped like Claude Code 2.x's first turn: a ~50 KB system prompt in blocks
    with cache_control, a dozen tools with extra fields (one a server tool), adaptive thinking,
    context management, output_config, metadata, max_tokens 32000, a system message inside
    `messages`, and text blocks with a system reminder."""
    rng = random.Random(7)
    text = ""
    while len(text) < 50_000:
        text += " ".join(rng.choice(CLAUDE_WORDS) for _ in range(12)) + ".\n"
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"command": {"type": "string", "description": "what to run"}},
        "required": ["command"],
        "additionalProperties": False,
    }
    tools: list[dict[str, Any]] = [
        {"name": name, "description": f"The {name} tool. " * 20, "input_schema": schema}
        for name in (
            "Task", "Bash", "Glob", "Grep", "LS", "Read", "Edit", "MultiEdit", "Write",
            "TodoWrite", "WebFetch",
        )
    ]  # fmt: skip
    tools[-1] |= {"cache_control": {"type": "ephemeral"}, "type": "custom"}
    tools.append({"type": "web_search_20250305", "name": "web_search", "max_uses": 8})
    reminder = "<system-reminder>\nAs you answer, use the tools.\n</system-reminder>"
    return {
        "model": model,
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "system", "content": "The working directory is /tmp."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": reminder},
                    {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}},
                ],
            },
        ],
        "tools": tools,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_0123_account__session_4567"},
        "temperature": 1,
    }


CLAUDE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
    "context-management-2025-06-27,fine-grained-tool-streaming-2025-05-14",
    "user-agent": "claude-cli/2.0.14 (external, cli)",
    "x-app": "cli",
}


def test_a_claude_code_prompt_beyond_the_context_is_400(claude: anthropic.Anthropic) -> None:
    body = {**claude_code_body("tiny-a"), "stream": False}
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.post(
            "/v1/messages?beta=true", body=body, cast_to=object, options={"headers": CLAUDE_HEADERS}
        )
    err = error_of(e.value)
    assert err["type"] == "invalid_request_error" and "context length" in err["message"]


# A server of its own: keys, an allow-list, limits, no prompt cache, quick pings -----------------

PING = "0.2"  # seconds (MLX_MANAGER_STREAM_PING_INTERVAL): every wait is longer than this


@pytest.fixture(scope="module")
def strict(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("messages")
    # Claude Code's prompt needs a longer context than the other tiny models' 2048 tokens.
    long_models = root / "models"
    build_model(long_models / "tiny-long", ModelSpec(max_position_embeddings=65536, seed=5))
    home = root / "home"
    env = models.env(
        home,
        model_dirs=f"{models.folder}:{long_models}",
        allowed_models="tiny-a,tiny-agent,tiny-big,tiny-long,broken,claude-*",
        max_body_bytes="256KiB",
        max_queue="2",
        batch_size="1",
        prompt_cache_bytes="0",  # every prompt is cold: input_tokens is the prompt's length
        stream_ping_interval=PING,
    )
    key = as_json(env, "keys", "create", "--name", "k1")["key"]
    server = start_server(home, env)
    server.key = key  # type: ignore[attr-defined]
    yield server
    server.stop()


def key_of(server: Server) -> str:
    return server.key  # type: ignore[attr-defined,no-any-return]


def test_keys(strict: Server) -> None:
    with pytest.raises(anthropic.AuthenticationError) as e:
        ask(sdk(strict, "wrong"), HELLO, model="tiny-a", max_tokens=2)
    assert error_of(e.value)["type"] == "authentication_error"
    r = httpx.post(strict.url + "/v1/messages", json={"model": "tiny-a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # x-api-key (the SDK's api_key) and Authorization: Bearer (its auth_token) both work.
    assert ask(sdk(strict, key_of(strict)), HELLO, model="tiny-a", max_tokens=2).usage
    bearer = anthropic.Anthropic(
        base_url=strict.url, auth_token=key_of(strict), max_retries=0, timeout=120
    )
    assert ask(bearer, HELLO, model="tiny-a", max_tokens=2).usage


def test_allow_list_is_403(strict: Server) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        ask(sdk(strict, key_of(strict)), HELLO, model="tiny-b")
    assert error_of(e.value)["type"] == "permission_error"


def test_body_limit_is_413(strict: Server) -> None:
    big = [{"role": "user", "content": "a" * 300_000}]
    with pytest.raises(anthropic.ContentTooLargeError) as e:
        ask(sdk(strict, key_of(strict)), big, model="tiny-a")
    err = error_of(e.value)
    assert err["type"] == "request_too_large" and "MLX_MANAGER_MAX_BODY_BYTES" in err["message"]


def test_full_queue_is_429(strict: Server) -> None:
    openai_client = openai.OpenAI(
        base_url=strict.v1, api_key=key_of(strict), max_retries=0, timeout=120
    )
    streams = [
        openai_client.chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=3000, stream=True, **NO_EOS
        )
        for _ in range(3)
    ]  # one decoding (batch size 1), two waiting: the queue is full
    try:
        with pytest.raises(anthropic.RateLimitError) as e:
            ask(sdk(strict, key_of(strict)), HELLO, model="tiny-a", max_tokens=2)
        assert error_of(e.value)["type"] == "rate_limit_error"
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        for s in streams:
            s.close()
    strict.wait_for(lambda: strict.worker("tiny-a")["in_flight"] == 0, what="streams to end")


def test_a_failed_load_is_503_or_a_stream_error(strict: Server) -> None:
    client = sdk(strict, key_of(strict))
    with pytest.raises(anthropic.ServiceUnavailableError) as e:
        ask(client, HELLO, model="broken")
    assert error_of(e.value)["type"] == "overloaded_error"
    # Streamed: the load takes longer than the wait before the stream opens, so the stream
    # has begun (pings) and the failure is its last event.
    headers = {"x-api-key": key_of(strict), "x-request-id": "anth-broken-stream"}
    body = {"model": "broken", "max_tokens": 5, "messages": HELLO}
    status, events = sse(strict.url, body, headers)
    assert status == 200 and events[0] == ("ping", {"type": "ping"})
    kind, data = events[-1]
    assert kind == "error" and data["error"]["type"] == "overloaded_error"
    assert "broken" in data["error"]["message"]
    assert {k for k, _ in events[:-1]} == {"ping"}
    logged = row(strict, "anth-broken-stream")  # the log has the failure, not the 200
    assert logged["status"] == 503 and "broken" in logged["error"]
    with pytest.raises(anthropic.APIStatusError) as e:
        streamed(client, HELLO, model="broken")
    assert error_of(e.value)["type"] == "overloaded_error"


def test_pings_while_a_model_loads(strict: Server) -> None:
    headers = {"x-api-key": key_of(strict)}
    for attempt in range(2):
        # tiny-big is not loaded: its load outlasts the wait before the stream opens.
        httpx.post(strict.url + "/admin/unload", json={"model": "tiny-big"}, headers=headers)
        strict.wait_for(lambda: gone(strict, "tiny-big"), what="tiny-big to unload")
        if attempt == 0:
            body = {"model": "tiny-big", "max_tokens": 5, "messages": HELLO, **GREEDY}
            status, events = sse(strict.url, body, headers)
            assert status == 200 and events[0] == ("ping", {"type": "ping"})
            kinds = [k for k, _ in events]
            assert kinds.index("ping") < kinds.index("message_start")
            check_sequence(events)
        else:  # the SDK skips pings wherever they come
            message = streamed(sdk(strict, key_of(strict)), HELLO, model="tiny-big", max_tokens=5)
            assert message.usage.input_tokens > 0


def test_a_stream_is_the_whole_answer(strict: Server) -> None:
    """With nothing cached, even usage is the same."""
    client = sdk(strict, key_of(strict))
    for messages, kw in (
        (ASK_WEATHER, {"tools": ANTH_TOOLS}),
        (ASK_THINK, {}),
        (ANTH_TOOL_RESULT, {"tools": ANTH_TOOLS}),
    ):
        same_answer(streamed(client, messages, **kw), ask(client, messages, **kw))
    text = {"model": "tiny-a", "max_tokens": 16}
    same_answer(streamed(client, HELLO, **text), ask(client, HELLO, **text))


def test_count_tokens_is_a_cold_creates_input_tokens(strict: Server) -> None:
    client = sdk(strict, key_of(strict))
    for messages, kw in (
        (ASK_WEATHER, {"tools": ANTH_TOOLS, "system": "Be brief."}),
        (ANTH_TOOL_RESULT, {"tools": ANTH_TOOLS}),
        (ASK_THINK, {}),
    ):
        counted = client.messages.count_tokens(model=AGENT, messages=messages, **kw).input_tokens
        reply = ask(client, messages, **kw)
        assert reply.usage.input_tokens == counted
        assert reply.usage.cache_read_input_tokens == 0


def test_request_log_rows_and_metrics(strict: Server) -> None:
    client = sdk(strict, key_of(strict))
    before = scrape(strict, strict.headers)
    made = client.messages.with_raw_response.create(
        model=AGENT,
        max_tokens=80,
        messages=ASK_THINK,
        extra_body=GREEDY,
        extra_headers={"x-request-id": "anth-create"},
    )
    reply = made.parse()
    with client.messages.stream(
        model=AGENT,
        max_tokens=80,
        messages=ASK_THINK,
        extra_body=GREEDY,
        extra_headers={"x-request-id": "anth-stream"},
    ) as s:
        s.get_final_message()
    counted = client.messages.count_tokens(
        model=AGENT, messages=ASK_THINK, extra_headers={"x-request-id": "anth-count"}
    )
    for rid, stream in (("anth-create", 0), ("anth-stream", 1)):
        r = row(strict, rid)
        assert (r["endpoint"], r["status"], r["key_name"], r["stream"]) == (
            "/v1/messages",
            200,
            "k1",
            stream,
        )
        assert r["model"] == AGENT and r["ttft_ms"] is not None
        assert (r["prompt_tokens"], r["completion_tokens"]) == (
            reply.usage.input_tokens,
            reply.usage.output_tokens,
        )
    r = row(strict, "anth-count")
    assert (r["endpoint"], r["status"], r["key_name"]) == ("/v1/messages/count_tokens", 200, "k1")
    assert r["prompt_tokens"] == counted.input_tokens
    after = scrape(strict, strict.headers)
    for endpoint, n in (("/v1/messages", 2), ("/v1/messages/count_tokens", 1)):
        labels = {"model": AGENT, "endpoint": endpoint, "status": "200"}
        name = "mlx_manager_requests_total"
        assert value(after, name, **labels) - value(before, name, **labels) == n


def test_max_tokens_beyond_the_limit_is_clamped(strict: Server) -> None:
    """Anthropic clients send what Claude allows: over the server's limit, max_tokens is cut
    to it on /v1/messages (OpenAI's endpoints refuse it, naming the limit)."""
    client = sdk(strict, key_of(strict))
    reply = ask(client, ASK_THINK, max_tokens=100_000)
    assert reply.content[-1].text == THINK_ANSWER
    openai_client = openai.OpenAI(
        base_url=strict.v1, api_key=key_of(strict), max_retries=0, timeout=120
    )
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=AGENT, messages=ASK_THINK, max_tokens=100_000)


def test_the_clamp_flag_in_the_limits() -> None:
    settings = Settings(max_tokens_limit=100)
    over = GenerationRequest(kind="chat", messages=HELLO, max_tokens=101)
    with pytest.raises(InvalidRequest):
        limits.check(over, settings)
    clamped = GenerationRequest(kind="chat", messages=HELLO, max_tokens=101, clamp_max_tokens=True)
    limits.check(clamped, settings)
    assert limits.capped(clamped, settings).max_tokens == 100


def test_a_claude_code_request(strict: Server) -> None:
    """Claude Code's request, as it sends it (?beta=true, its headers, everything above), to a
    model whose context holds it: the stream parses with the SDK's beta client. A profile
    named like a Claude model serves it, its context cut to the prompt plus a few tokens so
    that the answer is short whatever the random weights say."""
    key = key_of(strict)
    body = claude_code_body("tiny-long")
    assert len(json.dumps(body)) > 50_000
    r = httpx.post(
        strict.url + "/v1/messages/count_tokens?beta=true",
        json={k: v for k, v in body.items() if k not in ("max_tokens", "stream")},
        headers={**CLAUDE_HEADERS, "x-api-key": key},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    prompt = r.json()["input_tokens"]
    assert prompt > 2048
    profile = {
        "name": "claude-local",
        "model": "tiny-long",
        "aliases": ["claude-sonnet-4-5"],
        "context_length": prompt + 16,
    }
    r = httpx.post(strict.url + "/admin/profiles", json=profile, headers=strict.headers)
    assert r.status_code == 201, r.text

    client = sdk(strict, key, default_headers=CLAUDE_HEADERS)
    body["model"] = "claude-sonnet-4-5"
    fields = ("system", "tools", "thinking", "context_management", "output_config", "metadata")
    with client.beta.messages.stream(
        model=body["model"],
        max_tokens=body["max_tokens"],
        messages=body["messages"],
        **{f: body[f] for f in fields},
        extra_body={"temperature": body["temperature"]},
    ) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert message.model == "claude-sonnet-4-5" and message.role == "assistant"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens == prompt and 0 < message.usage.output_tokens <= 16
    assert all(b.type in ("text", "thinking", "tool_use") for b in message.content)
