"""The output splitter on its own: every way of cutting the text into pieces gives the same
channels, markers split across pieces included."""

from __future__ import annotations

import json

import pytest

from gateway.engine.channels import ChannelSplitter, Markers

MARKERS = Markers(think=("<think>", "</think>"), tool=("<tool_call>", "</tool_call>"))


def parse(body: str) -> dict[str, object]:
    return json.loads(body)


def run(text: str, pieces: int, markers: Markers = MARKERS, **kw: object) -> list[tuple[str, ...]]:
    """Feed `text` in pieces of `pieces` characters; merge neighbouring parts of a channel."""
    splitter = ChannelSplitter(markers, parse, **kw)  # type: ignore[arg-type]
    chunks = [text[i : i + pieces] for i in range(0, len(text), pieces)] or [""]
    out: list[tuple[str, ...]] = []
    for i, chunk in enumerate(chunks):
        for part in splitter.feed(chunk, final=i == len(chunks) - 1):
            if out and out[-1][0] == part[0] != "tool_start":
                out[-1] = (part[0], out[-1][1] + part[1])
            else:
                out.append(part)
    return out


CALL = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'


@pytest.mark.parametrize("pieces", [1, 2, 3, 7, 1000])
def test_channels_whatever_the_pieces(pieces: int) -> None:
    assert run("<think>hmm</think>Hi <b>", pieces) == [("reasoning", "hmm"), ("content", "Hi <b>")]
    two = [("tool_start", "f"), ("tool_args", '{"x": 1}')] * 2
    assert run("Sure." + CALL + CALL, pieces) == [("content", "Sure."), *two]
    # JSON calls kept well-formed by a grammar stream their arguments as written.
    spaced = '<tool_call> {"name": "f", "arguments": {"x": {"y": [1, 2]}} } </tool_call>'
    assert run(spaced + "ok", pieces, json_calls=True) == [
        ("tool_start", "f"),
        ("tool_args", '{"x": {"y": [1, 2]}}'),
        ("content", "ok"),
    ]
    # ... and one cut off by max_tokens ends where the text ended.
    assert run('<tool_call>{"name": "f", "arguments": {"x": [1', pieces, json_calls=True) == [
        ("tool_start", "f"),
        ("tool_args", '{"x": [1'),
    ]
    # Malformed: the model's own text comes back as content.
    broken = '<tool_call>{"name": "f", "arguments": </tool_call>'
    assert run(broken, pieces) == [("content", broken)]
    # Cut off inside a call (max_tokens): content too.
    assert run('<tool_call>{"name"', pieces) == [("content", '<tool_call>{"name"')]
    # A prompt that opened the think block.
    assert run("plan</think>done", pieces, in_reasoning=True) == [
        ("reasoning", "plan"),
        ("content", "done"),
    ]
    # Text that only looks like the start of a marker.
    assert run("a <thin b <tool c", pieces) == [("content", "a <thin b <tool c")]


def test_arguments_as_json_text_and_lists_of_calls() -> None:
    def many(body: str) -> object:
        return [{"name": "a", "arguments": '{"k": "v"}'}, {"name": "b"}]

    splitter = ChannelSplitter(MARKERS, many)
    assert splitter.feed("<tool_call>x</tool_call>", final=True) == [
        ("tool_start", "a"),
        ("tool_args", '{"k": "v"}'),
        ("tool_start", "b"),
        ("tool_args", "{}"),
    ]
    assert splitter.tool_calls == 2
    bad_args = ChannelSplitter(MARKERS, lambda b: {"name": "a", "arguments": "[1]"})
    assert bad_args.feed("<tool_call>x</tool_call>", final=True)[0][0] == "content"


@pytest.mark.parametrize("pieces", [1, 2, 5, 1000])
def test_an_output_that_is_one_call(pieces: int) -> None:
    """A call forced on a model without a tool-call format: the whole output is the call's
    JSON, no markers, its arguments streamed as written; cut off, it ends where the text did;
    cut off before its name is known, it is the model's text."""
    kw: dict[str, object] = {"markers": Markers(), "json_calls": True, "in_call": True}
    call = '{"name": "f", "arguments": {"x": {"y": "}"}}}'
    assert run(call, pieces, **kw) == [("tool_start", "f"), ("tool_args", '{"x": {"y": "}"}}')]
    assert run(call[:-6], pieces, **kw) == [("tool_start", "f"), ("tool_args", '{"x": {"y":')]
    assert run('{"name": "f', pieces, **kw) == [("content", '{"name": "f')]
