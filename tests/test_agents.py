"""Tool calls and reasoning through the OpenAI SDK, streamed and not, on a model overfit to
answer with known tool calls and think blocks (tests/agent_model.py)."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

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
    TIME_TOOL,
    TOOLS,
    WEATHER_TOOL,
)
from tests.conftest import NO_EOS, Models, Server

AGENT = "tiny-agent"
GREEDY = {"temperature": 0, "max_tokens": 80}
IGNORE_EOS_USAGE: dict[str, Any] = {
    "extra_body": {"ignore_eos": True},
    "stream_options": {"include_usage": True},
}


def ask(client: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return client.chat.completions.create(**{"model": AGENT, "messages": messages, **GREEDY, **kw})


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


class Color(enum.StrEnum):
    red = "red"
    blue = "blue"


class Owner(BaseModel):
    name: Annotated[str, Field(max_length=8)]  # bounded: the call always finishes
    age: Annotated[int, Field(ge=0, le=120)]


class Pet(BaseModel):
    color: Color
    owner: Owner


class Node(BaseModel):
    label: Color
    children: list[Node]


PET = {"type": "function", "function": {"name": "Pet"}}


def test_a_pydantic_tool_with_refs_is_held_to_its_schema(client: openai.OpenAI) -> None:
    """openai.pydantic_function_tool writes `$defs` and `$ref` for enums and nested models;
    nested under a call's arguments those references must still resolve, or the grammar
    would be dropped and the model write any call at all (here: get_weather's)."""
    tool = openai.pydantic_function_tool(Pet)
    for stream in (False, True):
        kw: dict[str, Any] = {"tools": [tool], "tool_choice": PET, "parallel_tool_calls": False}
        if stream:
            s = streamed(client, ASK_WEATHER, max_tokens=120, **kw)
            assert s["finish"] == "tool_calls" and s["content"] == ""
            calls = [(c["name"], c["arguments"]) for c in s["calls"]]
        else:
            reply = client.chat.completions.parse(
                model=AGENT, messages=ASK_WEATHER, **{**GREEDY, "max_tokens": 120, **kw}
            )
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            assert isinstance(call.function.parsed_arguments, Pet)  # the SDK's own check
            calls = [(call.function.name, call.function.arguments)]
        ((name, arguments),) = calls
        assert name == "Pet"
        jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_recursive_refs_compile_and_hold(tokenizer_of: Any) -> None:
    """A model that contains itself (`$ref` to its own definition) keeps its recursion once
    its parameters move under the call's grammar."""
    import llguidance.hf
    from llguidance import LLMatcher

    from gateway.engine.grammar import tool_call_grammar

    tok = tokenizer_of(AGENT)
    lltok = llguidance.hf.from_tokenizer(tok._tokenizer, eos_token=list(tok.eos_token_ids))
    grammar = tool_call_grammar([openai.pydantic_function_tool(Node)])

    def accepts(arguments: dict[str, Any]) -> bool:
        text = json.dumps({"name": "Node", "arguments": arguments})
        matcher = LLMatcher(lltok, grammar, log_level=0)
        ok = matcher.consume_tokens(tok.encode(text, add_special_tokens=False))
        return bool(ok) and not matcher.is_error() and matcher.is_accepting()

    leaf = {"label": "blue", "children": []}
    assert accepts({"label": "red", "children": [leaf, {"label": "red", "children": [leaf]}]})
    assert not accepts({"label": "red", "children": [{"label": "green", "children": []}]})
    assert not accepts({"label": "red", "children": [{"label": "red"}]})


def test_a_schema_that_cannot_be_enforced_is_refused(client: openai.OpenAI) -> None:
    """Never a call decoded without its grammar: a tool whose parameters cannot be compiled
    is a 400 that names it."""
    broken = {
        "type": "function",
        "function": {
            "name": "lookbehind",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}},
            },
        },
    }
    for tools in ([*TOOLS, broken], [broken]):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, ASK_WEATHER, tools=tools)
        assert "'lookbehind'" in e.value.body["message"] and e.value.body["param"] == "tools"
    missing = {"$ref": "#/$defs/Nowhere"}
    dangling = {"type": "function", "function": {"name": "dangling", "parameters": missing}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, ASK_WEATHER, tools=[dangling], tool_choice="required")
    assert "'dangling'" in e.value.body["message"]


def test_a_keyword_the_grammar_cannot_enforce_is_left_unenforced(client: openai.OpenAI) -> None:
    """Claude Code's tools use `propertyNames`, which llguidance does not implement: such a
    tool is offered and its calls are held to the rest of its schema, not refused."""
    weather = json.loads(json.dumps(WEATHER_TOOL))
    weather["function"]["parameters"]["propertyNames"] = {"pattern": "^[a-z]+$"}
    answer = ask(client, ASK_WEATHER, tools=[weather, TIME_TOOL]).choices[0]
    assert answer.finish_reason == "tool_calls"
    (call,) = answer.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_failing_call_grammar_ends_the_request_with_an_error(models: Models) -> None:
    """Inside the worker: should a call's grammar fail all the same (here one built the way
    the gateway once did, with a `$ref` that points at nothing), the request ends with an
    error instead of the model writing the call unconstrained. The real Engine and model,
    driven directly: the gateway refuses such a grammar before a worker sees it."""
    from llguidance import LLMatcher
    from mlx_lm import load

    from gateway.engine.generator import Engine
    from gateway.engine.protocol import Event, Failed, Started
    from gateway.engine.request import GenerationRequest

    model, tok = load(str(models.path(AGENT)))
    # submit() and step() only fill the event list: no pipe to the gateway is needed.
    engine = Engine(model, tok, conn=None, context_length=2048, batch_size=4, vocab_size=len(tok))
    arguments = {"$defs": {"C": {"type": "string"}}, "properties": {"city": {"$ref": "#/$defs/C"}}}
    nested = {"properties": {"name": {"const": "get_weather"}, "arguments": arguments}}
    request = GenerationRequest(
        kind="chat",
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        tool_grammar=LLMatcher.grammar_from_json_schema(json.dumps(nested)),
        max_tokens=40,
        temperature=0,
    )
    events: list[Event] = []
    engine.submit("r1", request.payload(), events)
    while engine.seqs:
        engine.step(events)
    assert [type(e) for e in events] == [Started, Failed], events
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert failed.kind == "ServiceError" and "/$defs/C" in failed.message


def test_a_forced_call_is_the_whole_answer(client: openai.OpenAI) -> None:
    """tool_choice required (or a named tool): after the call only the end may follow, or
    another call when parallel calls are allowed; never text. The model here is kept from
    ending (end-of-sequence banned) as a model that would go on writing is."""
    kw: dict[str, Any] = {"tools": TOOLS, "tool_choice": "required", **NO_EOS}
    reply = ask(client, ASK_WEATHER, parallel_tool_calls=False, **kw).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    assert [(c["name"], c["arguments"]) for c in plain_calls(reply.message)] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    s = streamed(client, ASK_WEATHER, parallel_tool_calls=False, **kw)
    assert (s["finish"], s["content"], len(s["calls"])) == ("tool_calls", "", 1)
    # Parallel calls allowed: whatever follows the first call is calls too.
    many = ask(client, ASK_WEATHER, **kw).choices[0]
    assert many.message.content is None and len(many.message.tool_calls) >= 1
    assert streamed(client, ASK_WEATHER, **kw)["content"] == ""


def test_ignore_eos_runs_to_max_tokens(client: openai.OpenAI) -> None:
    """ignore_eos (aiperf's and vLLM's benchmarks send it): end-of-sequence does not end
    the answer, max_tokens does."""
    short = ask(client, ASK_THINK)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40
    long = ask(client, ASK_THINK, max_tokens=40, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 40
    assert "</s>" not in long.choices[0].message.content  # end-of-sequence is not text
    chunks = list(ask(client, ASK_THINK, max_tokens=40, stream=True, **IGNORE_EOS_USAGE))
    assert chunks[-1].usage.completion_tokens == 40
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # With a response_format the answer is the JSON, then end-of-sequence to max_tokens.
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    shaped = ask(
        client, ASK_THINK, max_tokens=40, response_format=fmt, extra_body={"ignore_eos": True}
    )
    assert shaped.choices[0].finish_reason == "length" and shaped.usage.completion_tokens == 40
    jsonschema.validate(json.loads(shaped.choices[0].message.content), schema)
