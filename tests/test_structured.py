"""response_format: JSON enforced while decoding, on a random-weight model (which left alone
never writes JSON): every finished answer parses, and follows its schema; schemas are fuzzed."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HELLO = [{"role": "user", "content": "hello world"}]


def ask(client: openai.OpenAI, response_format: dict[str, Any], **kw: Any) -> Any:
    kw = {"max_tokens": 300, "temperature": 1.0, **kw}
    return client.chat.completions.create(
        model="tiny-a", messages=HELLO, response_format=response_format, **kw
    )


def streamed_text(client: openai.OpenAI, response_format: dict[str, Any], **kw: Any) -> str:
    chunks = ask(client, response_format, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_json_object(client: openai.OpenAI) -> None:
    finished = 0
    for seed in range(8):
        reply = ask(client, {"type": "json_object"}, seed=seed)
        text = reply.choices[0].message.content
        assert text.startswith("{"), text
        # Random weights may write a key until max_tokens cuts it; a finished one is whole.
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
            finished += 1
        # Streamed with the same seed: the same text.
        assert streamed_text(client, {"type": "json_object"}, seed=seed) == text
    assert finished >= 3
    # Without a response_format the same model does not write JSON.
    plain = client.chat.completions.create(
        model="tiny-a", messages=HELLO, max_tokens=30, seed=0
    ).choices[0]
    with pytest.raises(ValueError):
        json.loads(plain.message.content)


leaves = st.one_of(
    st.just({"type": "string", "maxLength": 6}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-50, 50),
        st.integers(0, 100),
    ),
    st.just({"type": "number", "minimum": 0, "maximum": 10}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(
        st.sampled_from(["red", "green", "blue", 1, 2, True, None]),
        min_size=1,
        max_size=3,
        unique=True,
    ).map(lambda values: {"enum": values}),
)


def _objects(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    names = st.from_regex(r"[a-z]{1,6}", fullmatch=True)
    props = st.dictionaries(names, children, min_size=1, max_size=3)
    return props.flatmap(
        lambda p: st.lists(st.sampled_from(sorted(p)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": p,
                "required": required,
                "additionalProperties": False,
            }
        )
    )


schemas = st.recursive(
    leaves,
    lambda children: st.one_of(
        _objects(children),
        children.map(lambda items: {"type": "array", "items": items, "maxItems": 3}),
    ),
    max_leaves=6,
)


def test_json_schema_fuzz(client: openai.OpenAI) -> None:
    finished: list[bool] = []

    @settings(
        max_examples=30,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(schema=schemas, seed=st.integers(0, 2**32))
    def run(schema: dict[str, Any], seed: int) -> None:
        fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
        choice = ask(client, fmt, seed=seed).choices[0]
        finished.append(choice.finish_reason == "stop")
        if choice.finish_reason == "stop":  # a cut-off answer (max_tokens) cannot be whole
            jsonschema.validate(json.loads(choice.message.content), schema)

    run()
    assert sum(finished) >= 0.9 * len(finished), finished


def test_bad_response_formats(client: openai.OpenAI) -> None:
    def refused(fmt: Any) -> dict[str, Any]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, fmt)
        return e.value.body

    err = refused({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}})
    assert err["param"] == "response_format" and "no" in err["message"]
    assert "json_schema is required" in refused({"type": "json_schema"})["message"]
    assert refused({"type": "xml"})["param"] == "response_format.type"
    # "text" is plain text, as without a response_format.
    assert ask(client, {"type": "text"}, max_tokens=5).choices[0].message.content is not None


def test_logprobs_of_ruled_out_tokens(client: openai.OpenAI) -> None:
    """A grammar rules most tokens out (logprob -inf, which JSON cannot carry): they are
    reported as -9999.0, as OpenAI does, streamed or not (the fuzz found the 500 this was)."""
    kw = {"seed": 1, "max_tokens": 6, "logprobs": True, "top_logprobs": 20}
    reply = ask(client, {"type": "json_object"}, **kw)
    tops = [t.logprob for e in reply.choices[0].logprobs.content for t in e.top_logprobs]
    assert tops and min(tops) == -9999.0
    chunks = ask(client, {"type": "json_object"}, stream=True, **kw)
    streamed = [
        t.logprob
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
        for t in e.top_logprobs
    ]
    assert streamed == tops
