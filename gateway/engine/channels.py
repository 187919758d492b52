"""Split a model's output text into the channels an OpenAI client expects: the answer
(`content`), thinking (`reasoning_content`) and tool calls.

The markers come from the model's tokenizer (mlx-lm infers them from the vocabulary and chat
template: `<think>`/`</think>`, `<tool_call>`/`</tool_call>`, ...), and a tool call's text is
parsed by the matching mlx-lm tool parser. Text arrives in pieces, as generated; a piece that
might be the start of a marker is held back until the next piece decides it. Pure Python (no
MLX): the worker runs one splitter per sequence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple


# ("content", text) | ("reasoning", text) | ("tool_start", name) | ("tool_args", json_text)
# A call is a "tool_start" then its arguments in one or more "tool_args" pieces.
class Part(NamedTuple):
    """A piece of output for one channel: content, reasoning, tool_start (a call's name) or
    tool_args (more of its arguments)."""

    kind: str
    text: str


# The start of a JSON call, up to its arguments' first character: {"name": "...", "arguments":
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
# What may still be the end of the call rather than of its arguments: its closing brace.
_CLOSING = re.compile(r"\s*\}?\s*$")


@dataclass(frozen=True)
class Markers:
    think: tuple[str, str] | None = None  # start, end
    tool: tuple[str, str] | None = None


class ChannelSplitter:
    def __init__(
        self,
        markers: Markers,
        parse_tool: Callable[[str], Any] | None,
        in_reasoning: bool = False,
        json_calls: bool = False,
        in_call: bool = False,
    ) -> None:
        """`json_calls`: calls are `{"name": ..., "arguments": {...}}` and a grammar keeps them
        well-formed, so their arguments can stream as they are written; otherwise a call is
        parsed whole at its end marker (and returned as content when it does not parse).
        `in_call`: the whole output is one JSON call, without markers (a forced call on a
        model that has no tool-call format of its own)."""
        self.markers = markers
        self.parse_tool = parse_tool
        self.json_calls = json_calls
        self.state = "reasoning" if in_reasoning and markers.think else "content"
        if in_call:
            self.state = "tool"
        self.buf = ""
        self.tool_calls = 0
        self.call_open = False  # a JSON call's name went out; its arguments are streaming
        self.args_at = 0  # where its arguments start in the call's text
        self.args_sent = 0  # how much of them went out

    def feed(self, text: str, final: bool = False) -> list[Part]:
        self.buf += text
        parts: list[Part] = []
        while True:
            opening = self._opening()
            closing = self._closing()
            wanted = [m for m in (*opening, closing) if m]
            hit = min(((self.buf.find(m), m) for m in wanted if m in self.buf), default=None)
            if hit is None:
                break
            at, marker = hit
            before, self.buf = self.buf[:at], self.buf[at + len(marker) :]
            self._switch(marker, before, parts)
        if final:
            self._flush(parts)
        else:
            keep = _partial_tail(self.buf, [m for m in (*self._opening(), self._closing()) if m])
            if self.state != "tool":
                self._emit(self.state, self.buf[: len(self.buf) - keep], parts)
                self.buf = self.buf[len(self.buf) - keep :]
            elif self.json_calls:
                self._stream_call(self.buf[: len(self.buf) - keep], parts, end=False)
        return parts

    def _opening(self) -> tuple[str, ...]:
        if self.state != "content":
            return ()
        return tuple(m[0] for m in (self.markers.think, self.markers.tool) if m)

    def _closing(self) -> str | None:
        if self.state == "reasoning" and self.markers.think:
            return self.markers.think[1]
        if self.state == "tool" and self.markers.tool:
            return self.markers.tool[1]
        return None

    def _switch(self, marker: str, before: str, parts: list[Part]) -> None:
        if self.state == "tool":
            self._tool(before, parts, closed=True)
            self.state = "content"
            return
        self._emit(self.state, before, parts)
        if self.state == "reasoning":
            self.state = "content"
        elif self.markers.think and marker == self.markers.think[0]:
            self.state = "reasoning"
        else:
            self.state = "tool"

    def _flush(self, parts: list[Part]) -> None:
        if self.state == "tool":
            self._tool(self.buf, parts, closed=False)
        else:
            self._emit(self.state, self.buf, parts)
        self.buf = ""

    def _stream_call(self, body: str, parts: list[Part], end: bool) -> bool:
        """Send what is known of a JSON call: its name once the header is complete, then its
        arguments as they grow, holding back what may be the call's own closing brace.
        False when the header has not (yet) been seen."""
        if not self.call_open:
            header = _HEADER.match(body)
            if header is None:
                return False
            parts.append(Part("tool_start", json.loads(f'"{header.group(1)}"')))
            self.call_open, self.args_at, self.args_sent = True, header.end(), 0
            self.tool_calls += 1
        args = body[self.args_at :]
        if end:  # the end marker came: drop the call's closing brace
            args = args.rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args
        else:
            args = args[: _CLOSING.search(args).start()]  # type: ignore[union-attr]
        if len(args) > self.args_sent:
            parts.append(Part("tool_args", args[self.args_sent :]))
            self.args_sent = len(args)
        return True

    def _tool(self, body: str, parts: list[Part], closed: bool) -> None:
        """The end of a tool-call block. A JSON call that has been streaming is finished (cut
        off, when `closed` is false); any other block is parsed whole into calls or, when it
        does not parse, given back as content exactly as the model wrote it."""
        assert self.parse_tool
        if self.json_calls and self._stream_call(body, parts, end=closed):
            self.call_open = False
            return
        calls = _parse(self.parse_tool, body)
        if calls is None:
            start, end = self.markers.tool or ("", "")
            self._emit("content", start + body + (end if closed else ""), parts)
            return
        for name, arguments in calls:
            parts.append(Part("tool_start", name))
            parts.append(Part("tool_args", arguments))
            self.tool_calls += 1

    @staticmethod
    def _emit(channel: str, text: str, parts: list[Part]) -> None:
        if not text:
            return
        if parts and parts[-1].kind == channel:
            parts[-1] = Part(channel, parts[-1].text + text)
        else:
            parts.append(Part(channel, text))


def _parse(parse_tool: Callable[[str], Any], body: str) -> list[tuple[str, str]] | None:
    try:
        parsed = parse_tool(body)
    except Exception:  # every parser signals bad model output its own way
        return None
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def _partial_tail(text: str, markers: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    for n in range(min(len(text), max((len(m) for m in markers), default=1) - 1), 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) for m in markers):
            return n
    return 0
