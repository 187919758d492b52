"""Thinking on and off, reasoning budgets, and forced tool calls on a model without a tool-call
format, through the OpenAI SDK on Chat Completions. tiny-agent (tests/agent_model.py) thinks
unless its template's `enable_thinking` is false; a copy of it without that switch is turned
off by an empty think block; tiny-a has random weights and a template that knows no tools."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from gateway.http.schemas import RESERVED_TEMPLATE_KWARGS
from tests.agent_model import ASK_THINK, SWITCHLESS_TEMPLATE, THINK_ANSWER, THOUGHT
from tests.conftest import NO_EOS, Models, Server
from tests.test_agents import streamed
from tests.test_mcp import call

AGENT = "tiny-agent"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 80}
OFF = {"chat_template_kwargs": {"enable_thinking": False}}

# Bounded arguments: a random model held to the schema always finishes the call.
PICK = {
    "type": "function",
    "function": {
        "name": "pick",
        "description": "Pick a city and a number of days",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
NOTE = {
    "type": "function",
    "function": {
        "name": "note",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 6}},
            "required": ["text"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (PICK, NOTE)}
HELLO = [{"role": "user", "content": "hello world"}]


def ask(client: openai.OpenAI, model: str = AGENT, **kw: Any) -> Any:
    kw = {"messages": ASK_THINK, **GREEDY, **kw}
    return client.chat.completions.create(model=model, **kw)


def reasoning_of(message: Any) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


def assert_not_thinking(reply: Any) -> None:
    message = reply.choices[0].message
    assert message.content == THINK_ANSWER and reasoning_of(message) is None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def assert_thinking(reply: Any) -> None:
    message = reply.choices[0].message
    assert (reasoning_of(message), message.content) == (THOUGHT, THINK_ANSWER)
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0


def test_thinking_off(client: openai.OpenAI) -> None:
    """Through the model's own switch (its template's `enable_thinking`), however asked:
    reasoning_effort "none", chat_template_kwargs, llama.cpp's budget of 0."""
    assert_thinking(ask(client))  # the model's default
    for how in ({"reasoning_effort": "none"}, {"extra_body": OFF}):
        assert_not_thinking(ask(client, **how))
        s = streamed(client, ASK_THINK, **how)
        assert (s["reasoning"], s["content"], s["finish"]) == ("", THINK_ANSWER, "stop")
    assert_not_thinking(ask(client, extra_body={"thinking_budget_tokens": 0}))
    # The template variable is the most explicit: it wins over the effort.
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    assert_thinking(ask(client, reasoning_effort="none", extra_body=on))
    for effort in ("low", "high", "max"):
        assert_thinking(ask(client, reasoning_effort=effort))


def test_a_budget_closes_the_think_block(client: openai.OpenAI, tokenizer_of: Any) -> None:
    """Two reasoning tokens, then the think block is closed and the answer follows (here
    end-of-sequence is banned: the answer cannot be empty)."""
    tok = tokenizer_of(AGENT)
    cut = tok.decode(tok.encode(THOUGHT, add_special_tokens=False)[:2])
    kw: dict[str, Any] = {**NO_EOS, "max_tokens": 16, "extra_body": {"thinking_budget_tokens": 2}}
    reply = ask(client, **kw)
    message = reply.choices[0].message
    assert reasoning_of(message) == cut and THOUGHT.startswith(cut) and cut != THOUGHT
    assert 0 < reply.usage.completion_tokens_details.reasoning_tokens <= 2
    # The end marker closed the block: it is not content (what the model writes after its
    # answer, with end-of-sequence banned, is its own affair).
    assert message.content and not message.content.startswith("</think>")
    s = streamed(client, ASK_THINK, **kw)
    assert (s["reasoning"], s["content"]) == (cut, message.content)
    # A budget larger than the thought changes nothing; -1 is no budget.
    assert_thinking(ask(client, extra_body={"thinking_budget_tokens": 100}))
    assert_thinking(ask(client, extra_body={"thinking_budget_tokens": -1}))


def test_a_profile_sets_thinking_and_its_budget(client: openai.OpenAI, server: Server) -> None:
    profiles = server.url + "/admin/profiles"
    quiet = {"name": "agent-quiet", "model": AGENT, "thinking": False}
    brief = {"name": "agent-brief", "model": AGENT, "reasoning_budget": 2}
    for body in (quiet, brief):
        r = httpx.post(profiles, json=body)
        assert r.status_code == 201, r.text
        assert {k: r.json()[k] for k in body} == body
    try:
        assert_not_thinking(ask(client, "agent-quiet"))
        assert_thinking(ask(client, "agent-quiet", reasoning_effort="high"))  # the request wins
        reply = ask(client, "agent-brief")
        assert reply.usage.completion_tokens_details.reasoning_tokens <= 2
        assert THOUGHT.startswith(reasoning_of(reply.choices[0].message) or "-")
        r = httpx.patch(profiles + "/agent-brief", json={"clear": ["reasoning_budget"]})
        assert r.status_code == 200 and r.json()["reasoning_budget"] is None, r.text
        assert_thinking(ask(client, "agent-brief"))
        bad = httpx.post(profiles, json={**quiet, "name": "agent-bad", "reasoning_budget": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_budget"
    finally:
        for body in (quiet, brief):
            httpx.delete(f"{profiles}/{body['name']}")


def copy_model(server: Server, models: Models, tmp_path: Path, name: str) -> Path:
    """A copy of a test model inside the server's models folder: not listed, but usable by
    its absolute path (a worker of its own)."""
    target = server.home / "models" / tmp_path.name / name
    return Path(shutil.copytree(models.path(name), target))


def unload(server: Server, folder: Path) -> None:
    httpx.post(server.url + "/admin/unload", json={"model": str(folder)}, timeout=60)


def test_a_model_without_a_switch_is_turned_off_by_an_empty_think_block(
    client: openai.OpenAI, server: Server, models: Models, tmp_path: Path
) -> None:
    folder = copy_model(server, models, tmp_path, AGENT)
    (folder / "chat_template.jinja").write_text(SWITCHLESS_TEMPLATE)
    mcp = server.url + "/mcp"
    assert call(mcp, "model_info", model=str(folder))["thinking_switch"] == "prefix"
    try:
        assert_thinking(ask(client, str(folder)))
        off = ask(client, str(folder), reasoning_effort="none")
        assert_not_thinking(off)
        # The block is the one Qwen3's template writes, in the prompt: the same prompt as
        # the switch makes, and none of it is output.
        switched = ask(client, reasoning_effort="none").usage
        assert (off.usage.prompt_tokens, off.usage.completion_tokens) == (
            switched.prompt_tokens,
            switched.completion_tokens,
        )
        s = streamed(client, ASK_THINK, model=str(folder), extra_body=OFF)
        assert (s["reasoning"], s["content"]) == ("", THINK_ANSWER)
    finally:
        unload(server, folder)


def test_model_info_says_how_thinking_is_switched(server: Server, client: openai.OpenAI) -> None:
    mcp = server.url + "/mcp"
    agent = call(mcp, "model_info", model=AGENT)
    assert (agent["reasoning"], agent["thinking_switch"]) == (True, "enable_thinking")
    plain = call(mcp, "model_info", model="tiny-a")
    assert (plain["reasoning"], plain["thinking_switch"]) == (False, None)
    # A model that does not think takes the fields all the same, and answers as it would.
    kw: dict[str, Any] = {"messages": HELLO, "max_tokens": 8, **NO_EOS}
    as_is = ask(client, "tiny-a", **kw).choices[0].message
    for how in (
        {"reasoning_effort": "none"},
        {"reasoning_effort": "low"},
        {"extra_body": {**OFF, "thinking_budget_tokens": 3}},
    ):
        message = ask(client, "tiny-a", **{**kw, **how}).choices[0].message
        assert message.content == as_is.content and reasoning_of(message) is None


def test_bad_thinking_fields_are_refused(client: openai.OpenAI) -> None:
    def refused(**extra: Any) -> dict[str, Any]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, extra_body=extra)
        return e.value.body

    err = refused(chat_template_kwargs={"tokenize": True, "add_generation_prompt": False, "x": 1})
    assert err["param"] == "chat_template_kwargs"
    assert "'add_generation_prompt', 'tokenize'" in err["message"]
    assert "apply_chat_template" in err["message"]
    assert refused(chat_template_kwargs={"messages": []})["param"] == "chat_template_kwargs"
    assert refused(chat_template_kwargs=[1])["param"] == "chat_template_kwargs"
    assert refused(reasoning_effort="huge")["param"] == "reasoning_effort"
    assert refused(thinking_budget_tokens=-2)["param"] == "thinking_budget_tokens"


def test_reserved_template_variables_are_apply_chat_templates_parameters() -> None:
    """The refused names are those transformers' apply_chat_template takes itself."""
    from transformers import PreTrainedTokenizerBase
    from transformers.utils.chat_template_utils import render_jinja_template

    own = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    own |= set(inspect.signature(render_jinja_template).parameters)
    assert own - {"self", "kwargs"} <= RESERVED_TEMPLATE_KWARGS


def forced_call(client: openai.OpenAI, model: str, **kw: Any) -> tuple[str, str]:
    """A forced call, asked plainly and streamed: the same one call both ways, ending the
    answer, its arguments following its tool's schema."""
    kw = {"messages": HELLO, "tools": [PICK, NOTE], **GREEDY, "max_tokens": 200, **kw}
    choice = client.chat.completions.create(model=model, **kw).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (c,) = choice.message.tool_calls  # one call, parallel_tool_calls or not
    assert c.type == "function" and c.id.startswith("call_")
    jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    s = streamed(client, kw.pop("messages"), model=model, **kw)
    assert (s["finish"], s["content"], s["indices"]) == ("tool_calls", "", [0])
    assert (s["calls"][0]["name"], s["calls"][0]["arguments"]) == (
        c.function.name,
        c.function.arguments,
    )
    return c.function.name, c.function.arguments


def test_forced_calls_on_a_model_without_a_tool_format(client: openai.OpenAI) -> None:
    """tiny-a's template knows nothing of tools and its tokenizer has no call markers: a
    forced call is its whole output, generated under the tool's JSON schema."""
    name, _ = forced_call(client, "tiny-a", tool_choice="required")
    assert name in SCHEMAS
    named = {"type": "function", "function": {"name": "note"}}
    assert forced_call(client, "tiny-a", tool_choice=named)[0] == "note"
    # The call ends the answer even where end-of-sequence is banned.
    forced_call(client, "tiny-a", tool_choice="required", parallel_tool_calls=False, **NO_EOS)


def test_tools_reach_a_template_that_ignores_them_only_when_a_call_is_forced(
    client: openai.OpenAI,
) -> None:
    """With tool_choice auto a model without a tool format just answers: its prompt is the
    one without tools. A forced call lists the tools in the system prompt, so that the
    model knows what it calls."""
    kw: dict[str, Any] = {"messages": HELLO, "max_tokens": 4, **NO_EOS}
    plain = ask(client, "tiny-a", **kw)
    auto = ask(client, "tiny-a", tools=[PICK], **kw)
    assert auto.usage.prompt_tokens == plain.usage.prompt_tokens
    assert auto.choices[0].message.content == plain.choices[0].message.content
    forced = ask(client, "tiny-a", tools=[PICK], tool_choice="required", **kw)
    assert forced.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_a_template_that_refuses_tools(
    client: openai.OpenAI, server: Server, models: Models, tmp_path: Path
) -> None:
    """A template that raises when given tools is not given them: tool_choice auto answers
    in text, a forced call still comes."""
    folder = copy_model(server, models, tmp_path, "tiny-a")
    template = (folder / "chat_template.jinja").read_text()
    refusing = "{% if tools %}{{ raise_exception('no tools here') }}{% endif %}" + template
    (folder / "chat_template.jinja").write_text(refusing)
    try:
        kw: dict[str, Any] = {"messages": HELLO, "max_tokens": 4, **NO_EOS}
        auto = ask(client, str(folder), tools=[PICK], **kw).choices[0]
        assert auto.finish_reason == "length" and auto.message.content
        forced_call(client, str(folder), tool_choice="required")
    finally:
        unload(server, folder)
