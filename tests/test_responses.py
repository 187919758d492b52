"""The OpenAI Responses API (/v1/responses) through the official SDK: answers with reasoning,
text and tool calls on the overfit agent model (tests/agent_model.py), streamed and not; stored
responses and previous_response_id; input_tokens; structured output; what Codex sends; errors,
keys, the request log and metrics. Every streamed event is checked against the SDK's own types."""

from __future__ import annotations

import asyncio
import json
import time
import typing
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from config.settings import SettingsError, load_settings
from config.store import Store, timestamp
from gateway.engine.protocol import Finished, Output, Reasoning, Text, ToolCallArgs, ToolCallStart
from gateway.errors import ModelUnavailable, NotFound
from gateway.http.responses import _events, _Response
from gateway.http.responses_schema import ResponseCreate, template_messages
from gateway.observe.usage import Usage
from gateway.service.responses import StoredResponses
from tests.agent_model import (
    ASK_THINK,
    ASK_WEATHER,
    FINAL_ANSWER,
    THINK_ANSWER,
    THOUGHT,
    TOOL_RESULT,
    TOOLS,
)
from tests.agent_model import template_messages as chat_template_messages
from tests.conftest import Models, Server, start_server

AGENT = "tiny-agent"
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 80}
# Responses' function tools are Chat Completions' functions, flat.
FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
WEATHER = "weather in Paris?"
THINK = "think first"


def as_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat Completions messages as the Responses input items that say the same."""
    items: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": m["tool_call_id"],
                    "output": m["content"],
                }
            )
            continue
        if m.get("content"):
            items.append({"role": m["role"], "content": m["content"]})
        for c in m.get("tool_calls") or []:
            f = c["function"]
            items.append(
                {
                    "type": "function_call",
                    "call_id": c["id"],
                    "name": f["name"],
                    "arguments": f["arguments"],
                }
            )
    return items


# Every event type the SDK knows, and its model: each streamed event is validated against it.
EVENT_MODELS = {
    typing.get_args(m.model_fields["type"].annotation)[0]: m
    for m in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


def sse(lines: Iterator[str]) -> list[dict[str, Any]]:
    """The events of an SSE body: each `event:` name must be its data's `type`."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
            assert data["type"] == name, (name, data)
            events.append(data)
    return events


def checked(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events numbered 0, 1, 2, ..., each a valid instance of the SDK's type for it, from
    response.created to one final event."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        TypeAdapter(EVENT_MODELS[e["type"]]).validate_python(e)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress"
    ends = ("response.completed", "response.incomplete", "response.failed")
    assert [e["type"] for e in events if e["type"] in ends] == [events[-1]["type"]]
    return events


def raw_stream(server: Server, body: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST", server.v1 + "/responses", json={**body, "stream": True}, timeout=60, **kw
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return checked(sse(r.iter_lines()))


def plain(output: list[Any]) -> list[Any]:
    """Output items without their ids (fresh per request), nulls, or what the SDK adds."""

    def clean(value: Any) -> Any:
        if isinstance(value, list):
            return [clean(v) for v in value]
        if not isinstance(value, dict):
            return value
        drop = ("id", "call_id", "parsed", "parsed_arguments")
        return {k: clean(v) for k, v in value.items() if v is not None and k not in drop}

    return clean([o if isinstance(o, dict) else o.model_dump() for o in output])


def same_answer(a: Any, b: Any) -> None:
    """Two responses to one request at temperature 0: the same items, status and token counts
    (the prompt cache may serve one and not the other: cached tokens may differ)."""
    a, b = (x if isinstance(x, dict) else x.model_dump() for x in (a, b))
    assert plain(a["output"]) == plain(b["output"])
    assert a["status"] == b["status"] and a["output_text"] == b["output_text"]
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert a["usage"][key] == b["usage"][key], key
    reasoning = [x["usage"]["output_tokens_details"]["reasoning_tokens"] for x in (a, b)]
    assert reasoning[0] == reasoning[1]


def create(client: openai.OpenAI, **kw: Any) -> Any:
    return client.responses.create(**{"model": AGENT, **GREEDY, **kw})


def stream_final(client: openai.OpenAI, **kw: Any) -> tuple[list[Any], Any]:
    """The SDK's stream accumulator: its events and the final response it puts together (for
    an answer cut short, the one its response.incomplete event carries)."""
    with client.responses.stream(**{"model": AGENT, **GREEDY, **kw}) as s:
        events = list(s)
        if events[-1].type == "response.incomplete":
            return events, events[-1].response
        return events, s.get_final_response()


# Answers ---------------------------------------------------------------------------------------


def test_reasoning_then_text(client: openai.OpenAI, server: Server) -> None:
    r = create(client, input=THINK)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.model == AGENT and r.error is None and r.incomplete_details is None
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", THOUGHT)]
    assert reasoning.summary == [] and reasoning.encrypted_content is None
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.id.startswith("msg_")
    assert [(c.type, c.text, c.annotations) for c in message.content] == [
        ("output_text", THINK_ANSWER, [])
    ]
    assert r.output_text == THINK_ANSWER == r.model_extra["output_text"]  # sent, not only computed
    u = r.usage
    assert 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens <= u.input_tokens

    # Streamed: the SDK's accumulator puts together the same answer.
    events, final = stream_final(client, input=THINK)
    same_answer(final, r)
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == THOUGHT
    assert final.output_text == THINK_ANSWER

    # The events, in order: each item opens, grows and closes before the next one opens.
    raw = raw_stream(server, {"model": AGENT, "input": THINK, **GREEDY})
    kinds = [e["type"] for e in raw if not e["type"].endswith(".delta")]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    text = [e for e in raw if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in text) == THINK_ANSWER
    assert {(e["output_index"], e["content_index"], str(e["logprobs"])) for e in text} == {
        (1, 0, "[]")
    }
    same_answer(raw[-1]["response"], r)


def test_a_tool_call(client: openai.OpenAI, server: Server) -> None:
    r = create(client, input=WEATHER, tools=FLAT_TOOLS)
    (call,) = r.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert r.output_text == "" and r.status == "completed"
    # The request's parameters come back with it.
    assert [t.name for t in r.tools] == ["get_weather", "get_time"]
    assert (r.tool_choice, r.parallel_tool_calls, r.temperature) == ("auto", True, 0)
    assert (r.max_output_tokens, r.store, r.truncation) == (80, True, "disabled")

    _, final = stream_final(client, input=WEATHER, tools=FLAT_TOOLS)
    same_answer(final, r)
    raw = raw_stream(server, {"model": AGENT, "input": WEATHER, "tools": FLAT_TOOLS, **GREEDY})
    pieces = [e["delta"] for e in raw if e["type"] == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == call.arguments  # streamed as written
    (done,) = [e for e in raw if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == call.arguments


def test_tool_choice(client: openai.OpenAI) -> None:
    def calls(r: Any) -> list[str]:
        return [o.name for o in r.output if o.type == "function_call"]

    kw: dict[str, Any] = {"tools": FLAT_TOOLS, "max_output_tokens": 60}
    assert calls(create(client, input=WEATHER, tool_choice="none", **kw)) == []
    # Forced: "required" on a prompt the model answers with text, a named tool, allowed tools.
    forced: list[tuple[str, Any]] = [
        (THINK, "required"),
        (WEATHER, {"type": "function", "name": "get_time"}),
        (
            WEATHER,
            {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "get_time"}],
            },
        ),
    ]
    for prompt, choice in forced:
        r = create(client, input=prompt, tool_choice=choice, parallel_tool_calls=False, **kw)
        names = calls(r)
        assert len(names) == 1 and r.output[0].type == "function_call", r.output
        if choice != "required":
            assert names == ["get_time"]
        echoed = r.tool_choice if isinstance(r.tool_choice, str) else r.tool_choice.to_dict()
        assert echoed == choice
        _, final = stream_final(
            client, input=prompt, tool_choice=choice, parallel_tool_calls=False, **kw
        )
        same_answer(final, r)
    # A hosted tool forced (not offered here): the model chooses among the functions.
    hosted = create(client, input=WEATHER, tool_choice={"type": "web_search_preview"}, **kw)
    assert calls(hosted) == ["get_weather"]


# Conversations ----------------------------------------------------------------------------------


def test_items_render_exactly_as_chat_messages(tokenizer_of: Any, client: openai.OpenAI) -> None:
    """The same conversation as Responses items and as Chat Completions messages is the same
    prompt, token for token: through the template here, and as the server counts it."""
    tok = tokenizer_of(AGENT)
    for messages, tools in ((ASK_WEATHER, TOOLS), (TOOL_RESULT, TOOLS), (ASK_THINK, None)):
        body = ResponseCreate.model_validate(
            {"model": AGENT, "input": as_items(messages), "tools": FLAT_TOOLS if tools else None}
        )
        (choice,) = body.generate_request().choices
        extra = {"tools": tools} if tools else {}
        expected = tok.apply_chat_template(
            chat_template_messages(messages), add_generation_prompt=True, **extra
        )
        assert choice.tools == tools
        got = tok.apply_chat_template(choice.messages, add_generation_prompt=True, **extra)
        assert got == expected
        counted = client.responses.input_tokens.count(
            model=AGENT, input=as_items(messages), tools=FLAT_TOOLS if tools else openai.omit
        )
        chat = client.chat.completions.create(
            model=AGENT, messages=messages, tools=tools or openai.omit, max_tokens=1
        )
        assert counted.object == "response.input_tokens"
        assert counted.input_tokens == chat.usage.prompt_tokens == len(expected)


def test_a_whole_tool_loop(client: openai.OpenAI) -> None:
    # Stateless, as Codex works: the whole conversation every time, nothing stored.
    r = create(client, input=as_items(TOOL_RESULT), tools=FLAT_TOOLS, store=False)
    assert r.output_text == FINAL_ANSWER and r.status == "completed"
    _, final = stream_final(client, input=as_items(TOOL_RESULT), tools=FLAT_TOOLS, store=False)
    same_answer(final, r)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)  # store: false keeps nothing

    # Stateful: the call, then only its output, continuing the stored response.
    first = create(client, input=WEATHER, tools=FLAT_TOOLS)
    (call,) = first.output
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}
    second = create(client, previous_response_id=first.id, input=[output], tools=FLAT_TOOLS)
    assert second.output_text == FINAL_ANSWER and second.previous_response_id == first.id
    _, final = stream_final(client, previous_response_id=first.id, input=[output], tools=FLAT_TOOLS)
    same_answer(final, second)


def test_stored_responses(client: openai.OpenAI, server: Server) -> None:
    first = create(client, input=THINK, metadata={"topic": "plans"}, instructions="Be brief.")
    assert first.metadata == {"topic": "plans"} and first.instructions == "Be brief."
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = create(client, input="and then?", previous_response_id=first.id, max_output_tokens=8)

    # Its input: the first one's input and output, then its own (instructions are not items).
    items = list(client.responses.input_items.list(second.id, order="asc", limit=1))
    assert [(i.type, getattr(i, "role", None)) for i in items] == [
        ("message", "user"),
        *[(o.type, getattr(o, "role", None)) for o in first.output],
        ("message", "user"),
    ]
    assert [i.id for i in items[1:-1]] == [o.id for o in first.output]
    assert items[0].content[0].text == THINK and items[-1].content[0].text == "and then?"
    assert len({i.id for i in items}) == len(items)
    # Newest first by default, a page at a time.
    page = client.responses.input_items.list(second.id, limit=2)
    assert [i.id for i in page.data] == [i.id for i in items[::-1][:2]] and page.has_more
    body = httpx.get(f"{server.v1}/responses/{second.id}/input_items", params={"limit": 2}).json()
    assert (body["object"], body["first_id"], body["last_id"]) == (
        "list",
        items[-1].id,
        items[-2].id,
    )
    rest = client.responses.input_items.list(second.id, after=page.data[-1].id, limit=100)
    assert [i.id for i in rest.data] == [i.id for i in items[::-1][2:]] and not rest.has_more

    # Deleted: gone, and its id cannot be continued; what continued it still can be.
    r = httpx.delete(f"{server.v1}/responses/{first.id}")
    assert r.json() == {"id": first.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        create(client, input="more", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    assert e.value.body["code"] == "previous_response_not_found"
    third = create(client, input="more", previous_response_id=second.id, max_output_tokens=4)
    expected = len(items) + len(second.output) + 1
    assert len(list(client.responses.input_items.list(third.id))) == expected
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)

    # store: false is never kept, so never continued.
    unstored = create(client, input=THINK, store=False)
    assert unstored.store is False
    for call in (
        lambda: client.responses.retrieve(unstored.id),
        lambda: client.responses.input_items.list(unstored.id),
        lambda: create(client, input="more", previous_response_id=unstored.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()

    for params, param in (
        ({"limit": 0}, "limit"),
        ({"order": "up"}, "order"),
        ({"after": "x"}, "after"),
    ):
        bad = httpx.get(f"{server.v1}/responses/{second.id}/input_items", params=params)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param


def test_input_tokens_are_the_usage_a_create_reports(client: openai.OpenAI, server: Server) -> None:
    first = create(client, input=WEATHER, tools=FLAT_TOOLS)
    bodies: list[dict[str, Any]] = [
        {"input": THINK},
        {"input": WEATHER, "tools": FLAT_TOOLS, "instructions": "Use the tools."},
        {"input": [{"role": "developer", "content": "Terse."}, {"role": "user", "content": THINK}]},
        {
            "previous_response_id": first.id,
            "input": [
                {
                    "type": "function_call_output",
                    "call_id": first.output[0].call_id,
                    "output": "rain",
                }
            ],
            "tools": FLAT_TOOLS,
        },
    ]
    for body in bodies:
        counted = client.responses.input_tokens.count(model=AGENT, **body).input_tokens
        made = create(client, **body, max_output_tokens=2, store=False)
        assert counted == made.usage.input_tokens, body
    # The model may be left out when a previous response says which.
    r = httpx.post(server.v1 + "/responses/input_tokens", json=bodies[-1])
    assert r.status_code == 200 and r.json()["input_tokens"] == counted
    r = httpx.post(server.v1 + "/responses/input_tokens", json={"input": THINK})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_cut_short_and_structured_output(client: openai.OpenAI, server: Server) -> None:
    short = create(client, input=THINK, max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3 and short.completed_at is None
    assert [(o.type, o.status) for o in short.output] == [("reasoning", "incomplete")]
    raw = raw_stream(server, {"model": AGENT, "input": THINK, **GREEDY, "max_output_tokens": 3})
    assert raw[-1]["type"] == "response.incomplete"
    same_answer(raw[-1]["response"], short)

    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "color", "schema": schema, "strict": True}
    for model in ("tiny-a", AGENT):
        shaped = client.responses.create(
            model=model, input="a color?", text={"format": fmt}, temperature=0, max_output_tokens=40
        )
        jsonschema.validate(json.loads(shaped.output_text), schema)
        assert shaped.text.format.type == "json_schema" and shaped.text.format.name == "color"
        _, final = stream_final(
            client, input="a color?", text={"format": fmt}, max_output_tokens=40, model=model
        )
        same_answer(final, shaped)
    any_object = client.responses.create(
        model="tiny-a",
        input="json?",
        text={"format": {"type": "json_object"}},
        max_output_tokens=60,
        temperature=0,
    )
    if any_object.status == "completed":
        assert isinstance(json.loads(any_object.output_text), dict)
    assert any_object.output_text.startswith("{")


# What Codex sends ------------------------------------------------------------------------------

CODEX_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command and returns its output.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "array", "items": {"type": "string"}},
                "workdir": {"type": "string"},
                "timeout_ms": {"type": "number"},
            },
            "required": ["command"],
            "additionalProperties": False,
        },
    },
    {"type": "web_search"},
    {"type": "local_shell"},
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Edit files with a patch.",
        "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch"'},
    },
    {
        "type": "namespace",
        "name": "mcp__demo__",
        "description": "Demo tools",
        "tools": [
            {
                "type": "function",
                "name": "lookup_order",
                "description": "Look up an order",
                "strict": False,
                "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
            }
        ],
    },
]


def codex_turn(model: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """A request as Codex CLI makes it (codex-rs: ResponsesApiRequest): everything every turn,
    nothing stored."""
    return {
        "model": model,
        "instructions": "You are Codex, a coding agent. Keep going until the task is done.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [
                    {"type": "input_text", "text": "<permissions>workspace-write</permissions>"}
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {
                        "type": "input_text",
                        "text": "<environment_context>/tmp</environment_context>",
                    }
                ],
            },
            *history,
        ],
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": str(uuid.uuid4()),
        "text": {"verbosity": "medium"},
    }


def as_codex_resends(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as Codex puts it in its next request: no ids, no reasoning text."""
    item = {k: v for k, v in item.items() if k not in ("id", "status")}
    if item["type"] == "reasoning":
        item.pop("content", None)
        item["encrypted_content"] = None
    return item


def test_what_codex_sends(server: Server) -> None:
    """Codex's request shape: hosted and custom tools are ignored (not refused), the stream
    ends with its final event, and the next turn (the history sent back) works the same."""
    r = httpx.post(
        server.url + "/admin/profiles",
        json={"name": "codex-agent", "model": AGENT, "max_tokens": 40, "temperature": 0},
    )
    assert r.status_code == 201, r.text
    headers = {"OpenAI-Beta": "responses=experimental", "originator": "codex_cli_rs"}
    try:
        history: list[dict[str, Any]] = [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": WEATHER}],
            }
        ]
        for _ in range(2):
            events = raw_stream(server, codex_turn("codex-agent", history), headers=headers)
            final = events[-1]["response"]
            assert events[-1]["type"] in ("response.completed", "response.incomplete")
            assert final["store"] is False and final["usage"]["input_tokens"] > 0
            assert [t["type"] for t in final["tools"]] == [t["type"] for t in CODEX_TOOLS]
            assert final["reasoning"] == {"effort": "medium", "summary": "auto"}
            done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
            assert done == final["output"]
            assert all(i["type"] in ("message", "reasoning", "function_call") for i in done)
            # What Codex does next: resend it all, with each call's output.
            history += [as_codex_resends(i) for i in done]
            history += [
                {"type": "function_call_output", "call_id": i["call_id"], "output": "exit 0"}
                for i in done
                if i["type"] == "function_call"
            ]
            history.append({"type": "message", "role": "user", "content": "go on"})
            assert httpx.get(f"{server.v1}/responses/{final['id']}").status_code == 404
    finally:
        httpx.delete(server.url + "/admin/profiles/codex-agent")


# Errors ------------------------------------------------------------------------------------------


def test_bad_requests_are_refused_in_openai_shape(client: openai.OpenAI, server: Server) -> None:
    def refused(**kw: Any) -> dict[str, Any]:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{"model": AGENT, "input": THINK, **kw})
        assert e.value.status_code == 400
        return e.value.body

    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role"),
        ({"input": [{"role": "user", "content": [image]}]}, "input.0.content.0"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{x"}]},
            "input.0.arguments",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"tools": [{"type": "function", "parameters": {}}]}, "tools.0.name"),
        ({"tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
        ({"background": True}, "background"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"reasoning": {"effort": "maximal"}}, "reasoning.effort"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        (
            {
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "x",
                        "schema": {"type": "string", "pattern": "(?<=x)y"},
                    }
                }
            },
            "text.format",
        ),
        ({"conversation": "conv_1"}, "conversation"),
        ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65),
    ]
    for kw, param in cases:
        err = refused(**kw)
        assert err["param"] == param and err["message"], (kw, err)
    assert "read text only" in refused(input=[{"role": "user", "content": [image]}])["message"]
    assert (
        "nope"
        in refused(tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "nope"})["message"]
    )

    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="no-such-model", input=THINK)
    assert e.value.body["code"] == "model_not_found"
    for call in (
        lambda: create(client, input=THINK, previous_response_id="resp_nope"),
        lambda: client.responses.input_tokens.count(model=AGENT, previous_response_id="resp_nope"),
        lambda: client.responses.retrieve("resp_nope"),
        lambda: client.responses.delete("resp_nope"),
        lambda: client.responses.input_items.list("resp_nope"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert "resp_nope" in e.value.body["message"]

    url = server.v1 + "/responses"
    missing = httpx.post(url, json={"input": THINK})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    typed = httpx.post(url, content=b'{"model": "x"}', headers={"content-type": "text/plain"})
    assert typed.status_code == 415 and typed.json()["error"]["code"] == "unsupported_media_type"
    broken = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    empty = httpx.post(url, json={"model": AGENT, "input": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"


@pytest.fixture(scope="module")
def keyed(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that needs a key (MLX_MANAGER_API_KEY is the key named "env"; its token file
    is the key named "local") and keeps 3 stored responses."""
    home = tmp_path_factory.mktemp("responses") / "home"
    server = start_server(home, models.env(home, api_key="k-env-1234", response_retention="3"))
    yield server
    server.stop()


def test_keys_and_the_request_log(keyed: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.v1, api_key="wrong", max_retries=0).responses.create(
            model=AGENT, input=THINK
        )
    env = openai.OpenAI(base_url=keyed.v1, api_key="k-env-1234", max_retries=0, timeout=60)
    local = openai.OpenAI(base_url=keyed.v1, api_key=keyed.token, max_retries=0, timeout=60)
    ids = {"plain": "t-resp-plain", "stream": "t-resp-stream", "count": "t-resp-count"}
    r = create(env, input=THINK, extra_headers={"x-request-id": ids["plain"]})
    with env.responses.stream(
        model=AGENT, input=THINK, **GREEDY, extra_headers={"x-request-id": ids["stream"]}
    ) as s:
        s.until_done()
    counted = env.responses.input_tokens.count(
        model=AGENT, input=THINK, extra_headers={"x-request-id": ids["count"]}
    )
    # A stored response is its key's: another key is told it does not exist.
    assert env.responses.retrieve(r.id).id == r.id
    with pytest.raises(openai.NotFoundError):
        local.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        create(local, input="more", previous_response_id=r.id)

    def row(request_id: str) -> dict[str, Any]:
        def find() -> list[dict[str, Any]]:
            got = httpx.get(
                keyed.url + "/admin/requests", params={"limit": 100}, headers=keyed.headers
            )
            return [x for x in got.json()["data"] if x["request_id"] == request_id]

        (found,) = keyed.wait_for(find, what=f"{request_id} in the request log")
        return found

    for name, stream in (("plain", False), ("stream", True)):
        x = row(ids[name])
        assert (x["endpoint"], x["key_name"], x["status"], x["stream"]) == (
            "/v1/responses",
            "env",
            200,
            stream,
        )
        assert (x["prompt_tokens"], x["completion_tokens"]) == (
            r.usage.input_tokens,
            r.usage.output_tokens,
        )
        assert (
            x["ttft_ms"] > 0 and x["duration_ms"] >= x["ttft_ms"] and x["finish_reason"] == "stop"
        )
    x = row(ids["count"])
    assert (x["endpoint"], x["key_name"], x["prompt_tokens"]) == (
        "/v1/responses/input_tokens",
        "env",
        counted.input_tokens,
    )
    metrics = httpx.get(keyed.url + "/metrics", headers=keyed.headers).text
    assert (
        'mlx_manager_requests_total{endpoint="/v1/responses",model="tiny-agent",status="200"}'
        in metrics
    )
    assert 'endpoint="/v1/responses/input_tokens"' in metrics


def test_stored_responses_are_pruned_to_the_retention(keyed: Server) -> None:
    env = openai.OpenAI(base_url=keyed.v1, api_key="k-env-1234", max_retries=0, timeout=60)
    made = [create(env, input=THINK, max_output_tokens=2).id for _ in range(4)]
    with pytest.raises(openai.NotFoundError):
        env.responses.retrieve(made[0])
    assert [env.responses.retrieve(i).id for i in made[1:]] == made[1:]


# In process ----------------------------------------------------------------------------------


class FailingStream:
    """A generation whose worker dies after a few tokens."""

    def __init__(self, events: list[Output]) -> None:
        self.events = events
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[Output]:
        for ev in self.events:
            yield ev
        raise ModelUnavailable("The worker for 'tiny-agent' stopped (exit code -9).")

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=5, completion_tokens=len(self.events))

    def close(self) -> None:
        self.closed = True


def test_a_failure_midway_ends_the_stream_with_error_events() -> None:
    body = ResponseCreate.model_validate({"model": AGENT, "input": THINK, "store": False})
    stream = FailingStream(
        [
            Reasoning(0, "hmm"),
            Text(0, "Here", None),
            ToolCallStart(0, "call_1", "f"),
            ToolCallArgs(0, "{"),
        ]
    )

    async def run() -> list[dict[str, Any]]:
        response = _Response(body)
        events = _events(None, stream, body, response, [], None)  # type: ignore[arg-type]
        return sse(b"".join([e async for e in events]).decode().splitlines())

    events = checked(asyncio.run(run()))
    assert stream.closed
    error, failed = events[-2:]
    assert (error["type"], error["code"]) == ("error", "model_unavailable")
    assert "exit code -9" in error["message"]
    response = failed["response"]
    assert response["status"] == "failed" and response["error"]["code"] == "server_error"
    assert [(o["type"], o["status"]) for o in response["output"]] == [
        ("reasoning", "completed"),
        ("message", "completed"),
        ("function_call", "incomplete"),
    ]
    assert response["output"][2]["arguments"] == "{" and response["output_text"] == "Here"


def test_events_of_an_answer_that_says_nothing() -> None:
    """A model that ends at once still answers with a (empty) message, as OpenAI does."""
    body = ResponseCreate.model_validate({"model": AGENT, "input": THINK, "store": False})

    class Empty(FailingStream):
        async def __aiter__(self) -> AsyncIterator[Output]:
            yield Finished(0, "stop", 1)

    async def run() -> list[dict[str, Any]]:
        events = _events(None, Empty([]), body, _Response(body), [], None)  # type: ignore[arg-type]
        return sse(b"".join([e async for e in events]).decode().splitlines())

    events = checked(asyncio.run(run()))
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [(o["type"], o["content"][0]["text"]) for o in final["output"]] == [("message", "")]


def test_reasoning_goes_with_the_assistant_turn_it_led_to() -> None:
    items = ResponseCreate.model_validate(
        {
            "model": AGENT,
            "input": [
                {"role": "user", "content": "q"},
                {
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "T1"}],
                },
                {"role": "assistant", "content": "a1"},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "T2"}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [
                        {"type": "input_text", "text": "ok"},
                        {"type": "input_image", "image_url": "x"},
                    ],
                },
                {"type": "reasoning", "summary": []},  # as Codex sends it back: no text
                {"type": "web_search_call", "action": {"type": "search"}},  # not ours: left out
                {"role": "assistant", "content": "done"},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "lost"}]},
            ],
        }
    ).input
    assert template_messages("sys", items) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "a1",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
            ],
            "reasoning_content": "T1\nT2",
        },
        {
            "role": "tool",
            "content": "ok[input_image: not shown, this model reads text only]",
            "tool_call_id": "c",
        },
        {"role": "assistant", "content": "done"},
    ]


def test_stored_responses_expire(tmp_path: Path) -> None:
    settings = load_settings(
        environ={"MLX_MANAGER_HOME": str(tmp_path), "MLX_MANAGER_RESPONSE_RETENTION": "1h"}
    )
    store = Store(settings.db_path)
    kept = StoredResponses(store, settings)
    kept.save({"id": "resp_new", "output": []}, [], None)
    old = {
        "id": "resp_old",
        "time": timestamp(time.time() - 7200),
        "key_name": None,
        "response": "{}",
        "input_items": "[]",
    }
    store.db.table("responses").insert(old)
    with pytest.raises(NotFound):
        kept.get("resp_old", None)  # expired, even before a write prunes it
    assert kept.get("resp_new", None).response["id"] == "resp_new"
    assert kept.prune() == 1 and store.response("resp_old") is None
    off = load_settings(
        environ={"MLX_MANAGER_HOME": str(tmp_path), "MLX_MANAGER_RESPONSE_RETENTION": "0"}
    )
    nothing = StoredResponses(store, off)
    with pytest.raises(NotFound):
        nothing.get("resp_new", None)
    nothing.save({"id": "resp_other", "output": []}, [], None)
    assert store.response("resp_other") is None and nothing.prune() == 1
    with pytest.raises(SettingsError, match="response retention"):
        load_settings(
            environ={"MLX_MANAGER_HOME": str(tmp_path), "MLX_MANAGER_RESPONSE_RETENTION": "a month"}
        )
