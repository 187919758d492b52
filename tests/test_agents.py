"""Tool calls and reasoning through the OpenAI SDK, streamed and not, on a model overfit to
answer with known tool calls and think blocks (tests/agent_model.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.agent_model import (
    ASK_BROKEN,
    ASK_THINK,
    ASK_TWO,
    ASK_WEATHER,
    BROKEN_CALL,
    CALL_PARIS,
    FINAL_ANSWER,
    THINK_ANSWER,
    THOUGHT,
    TOOLS,
)
from tests.conftest import Server

AGENT = "tiny-agent"
GREEDY = {"temperature": 0, "max_tokens": 80}


def ask(client: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return client.chat.completions.create(model=AGENT, messages=messages, **{**GREEDY, **kw})


def streamed(client: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """A stream put back together the way agent frameworks do: content and reasoning by
    concatenation, tool calls by their `index`, arguments by concatenation."""
    content, reasoning, finish = "", "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in ask(client, messages, stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return {
        "content": content,
        "reasoning": reasoning,
        "calls": [calls[i] for i in sorted(calls)],
        "indices": sorted(calls),
        "finish": finish,
    }


def plain_calls(message: Any) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]


def test_a_tool_call(client: openai.OpenAI) -> None:
    reply = ask(client, ASK_WEATHER, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # nothing leaks into content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    s = streamed(client, ASK_WEATHER, tools=TOOLS)
    assert s["finish"] == "tool_calls" and s["content"] == "" and s["indices"] == [0]
    assert s["calls"][0]["id"].startswith("call_")
    # The stream, put together, is the non-streamed answer (ids are fresh per request).
    strip = [{k: v for k, v in c.items() if k != "id"} for c in plain_calls(choice.message)]
    assert [{k: v for k, v in c.items() if k != "id"} for c in s["calls"]] == strip


def test_parallel_calls_have_distinct_indices(client: openai.OpenAI) -> None:
    reply = ask(client, ASK_TWO, tools=TOOLS)
    calls = plain_calls(reply.choices[0].message)
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c["id"] for c in calls}) == 2
    s = streamed(client, ASK_TWO, tools=TOOLS)
    assert s["indices"] == [0, 1]
    assert [(c["name"], c["arguments"]) for c in s["calls"]] == [
        (c["name"], c["arguments"]) for c in calls
    ]
    # parallel_tool_calls=false: the first call only.
    one = ask(client, ASK_TWO, tools=TOOLS, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    # n=2: each choice numbers its own calls from 0.
    both = streamed(client, ASK_TWO, tools=TOOLS, n=2)
    assert both["indices"] == [0, 1]


def test_the_grammar_keeps_calls_well_formed(client: openai.OpenAI) -> None:
    """Trained to write a broken call, the model is held by the lazy tool-call grammar to a
    call of a real tool with arguments that follow its parameters."""
    reply = ask(client, ASK_BROKEN, tools=TOOLS)
    choice = reply.choices[0]
    calls = plain_calls(choice.message)
    assert calls and choice.finish_reason in ("tool_calls", "length")
    assert calls[0]["name"] == "get_weather"  # where the model went before it broke
    for call in calls if choice.finish_reason == "tool_calls" else calls[:1]:
        args = json.loads(call["arguments"])
        if call["name"] == "get_weather":
            assert isinstance(args["city"], str)
        else:
            assert call["name"] == "get_time" and isinstance(args, dict)
    assert BROKEN_CALL not in (choice.message.content or "")
    s = streamed(client, ASK_BROKEN, tools=TOOLS)
    assert [(c["name"], c["arguments"]) for c in s["calls"]] == [
        (c["name"], c["arguments"]) for c in calls
    ]


def test_arguments_stream_before_the_call_ends(client: openai.OpenAI) -> None:
    """Cut off by max_tokens inside its arguments, a call has already sent what it wrote:
    arguments go out as they are generated, and the stream still equals the plain answer."""
    for max_tokens in range(2, 30):
        reply = ask(client, ASK_WEATHER, tools=TOOLS, max_tokens=max_tokens)
        calls = plain_calls(reply.choices[0].message)
        if calls and calls[0]["arguments"] and reply.choices[0].finish_reason == "length":
            break
    else:
        raise AssertionError("no cut-off point fell inside the arguments")
    with pytest.raises(ValueError):
        json.loads(calls[0]["arguments"])  # a part of '{"city": "Paris"}'
    assert '{"city": "Paris"}'.startswith(calls[0]["arguments"])
    s = streamed(client, ASK_WEATHER, tools=TOOLS, max_tokens=max_tokens)
    assert s["finish"] == "length"
    assert [(c["name"], c["arguments"]) for c in s["calls"]] == [
        (c["name"], c["arguments"]) for c in calls
    ]


def test_a_whole_tool_loop(client: openai.OpenAI) -> None:
    """call -> the tool's result -> the final answer, with the SDK's own message objects."""
    first = ask(client, ASK_WEATHER, tools=TOOLS).choices[0].message
    (call,) = first.tool_calls
    assert json.loads(call.function.arguments)["city"] == "Paris"
    messages = [
        *ASK_WEATHER,
        first.model_dump(exclude_none=True),  # role, content None, tool_calls
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    final = ask(client, messages, tools=TOOLS).choices[0]
    assert final.message.content == FINAL_ANSWER and final.finish_reason == "stop"
    assert streamed(client, messages, tools=TOOLS)["content"] == FINAL_ANSWER


def test_reasoning_goes_to_reasoning_content(client: openai.OpenAI, server: Server) -> None:
    message = ask(client, ASK_THINK).choices[0].message
    assert message.content == THINK_ANSWER
    assert message.model_extra["reasoning_content"] == THOUGHT
    s = streamed(client, ASK_THINK)
    assert (s["reasoning"], s["content"]) == (THOUGHT, THINK_ANSWER)
    # Kept inline on request (llama.cpp's "none" means the same).
    inline = f"<think>{THOUGHT}</think>{THINK_ANSWER}"
    for fmt in ("inline", "none"):
        m = ask(client, ASK_THINK, extra_body={"reasoning_format": fmt}).choices[0].message
        assert m.content == inline and "reasoning_content" not in (m.model_extra or {})
    kept = streamed(client, ASK_THINK, extra_body={"reasoning_format": "inline"})
    assert kept["content"] == inline and kept["reasoning"] == ""
    # ... or by a profile.
    r = httpx.post(
        server.url + "/admin/profiles",
        json={"name": "agent-inline", "model": AGENT, "reasoning_format": "inline"},
    )
    assert r.status_code == 201, r.text
    try:
        m = client.chat.completions.create(model="agent-inline", messages=ASK_THINK, **GREEDY)
        assert m.choices[0].message.content == inline
    finally:
        httpx.delete(server.url + "/admin/profiles/agent-inline")


def test_tool_choice(client: openai.OpenAI) -> None:
    # "none": the template gets no tools and nothing is parsed as a call.
    none = ask(client, ASK_WEATHER, tools=TOOLS, tool_choice="none").choices[0]
    assert not none.message.tool_calls and none.finish_reason != "tool_calls"
    # "required" on a prompt the model would answer with text: the output starts as a call.
    # (and the tool-call grammar makes it a well-formed one).
    required = ask(client, ASK_THINK, tools=TOOLS, tool_choice="required").choices[0].message
    assert required.tool_calls and required.tool_calls[0].function.name in (
        "get_weather",
        "get_time",
    )
    # A named function: only that tool is offered, so only it can be called.
    named = {"type": "function", "function": {"name": "get_time"}}
    forced = ask(client, ASK_WEATHER, tools=TOOLS, tool_choice=named).choices[0].message
    assert forced.tool_calls and {c.function.name for c in forced.tool_calls} == {"get_time"}


def test_bad_tool_requests(client: openai.OpenAI) -> None:
    def refused(**kw: Any) -> dict[str, Any]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, **kw)
        return e.value.body

    unknown = {"type": "function", "function": {"name": "nope"}}
    err = refused(messages=ASK_WEATHER, tools=TOOLS, tool_choice=unknown)
    assert "nope" in err["message"] and "get_weather" in err["message"]
    assert (
        "tool_choice needs tools"
        in refused(messages=ASK_WEATHER, tool_choice="required")["message"]
    )
    bad_args = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{x"}}
            ],
        },
    ]
    err = refused(messages=bad_args, tools=TOOLS)
    assert err["param"] == "messages.1.tool_calls.0.function.arguments"
    err = refused(messages=ASK_WEATHER, tools=[{"type": "function", "function": {}}])
    assert err["param"] == "tools.0.function.name"


def test_a_profile_picks_the_tool_parser(client: openai.OpenAI, server: Server) -> None:
    """The tokenizer's parser (json_tools, inferred from the template) is the default; a
    profile may name another, here one that does not read this model's format: what does
    not parse comes back as content, exactly as the model wrote it."""
    r = httpx.post(
        server.url + "/admin/profiles",
        json={"name": "agent-xml", "model": AGENT, "tool_parser": "qwen3_coder"},
    )
    assert r.status_code == 201, r.text
    try:
        reply = client.chat.completions.create(
            model="agent-xml", messages=ASK_WEATHER, tools=TOOLS, **GREEDY
        )
        message = reply.choices[0].message
        assert not message.tool_calls and message.content == CALL_PARIS
    finally:
        httpx.delete(server.url + "/admin/profiles/agent-xml")
    bad = httpx.post(
        server.url + "/admin/profiles",
        json={"name": "agent-bad", "model": AGENT, "tool_parser": "nope"},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tool_parser" and "json_tools" in bad.text
