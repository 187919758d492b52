"""Grammars for constrained decoding, compiled by llguidance (the library llama.cpp, vLLM and
SGLang use) here in the gateway, once per distinct schema: `response_format` (a bad schema is a
400 before it reaches a worker) and the shape of a JSON tool call. The worker enforces them token
by token (gateway/worker.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from gateway.errors import InvalidRequest

# JSON whose layout the model chooses freely would let it pad with whitespace forever.
_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar a response must follow; None for plain text."""
    if not response_format or response_format.get("type") == "text":
        return None
    from llguidance import LLMatcher

    if response_format["type"] == "json_object":
        schema: dict[str, Any] = {"type": "object"}
    else:
        schema = response_format["json_schema"].get("schema") or {}  # {}: any JSON value
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_OPTIONS)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"Invalid JSON schema: {e}", param="response_format") from None
    except RecursionError:  # request bodies are depth-limited; this is for other callers
        raise InvalidRequest(
            "Unsupported JSON schema: it is nested too deeply.", param="response_format"
        ) from None
    error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise InvalidRequest(
            f"Unsupported JSON schema: {'; '.join(messages)}", param="response_format"
        )
    return grammar


@lru_cache(maxsize=256)
def grammar_for_text(response_format: str) -> str | None:
    """grammar_for, cached by the response_format's JSON (clients resend the same schema)."""
    return grammar_for(json.loads(response_format))


def tool_call_grammar(tools: list[dict[str, Any]]) -> str:
    """`{"name": <one of the tools>, "arguments": <that tool's parameters>}`, in the layout
    json.dumps and chat templates use: a worker holds a JSON-format tool call to it once the
    model opens one."""
    return _tool_call_grammar(json.dumps(tools))  # key order kept: it is the call's order


@lru_cache(maxsize=64)
def _tool_call_grammar(tools_json: str) -> str:
    from llguidance import LLMatcher

    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "arguments": t["function"].get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in json.loads(tools_json)
        ]
    }
    # Free whitespace would let a model pad a call forever.
    layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=layout)
