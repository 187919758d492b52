"""`response_format` as a grammar: JSON schemas compiled by llguidance (the constrained-decoding
library llama.cpp, vLLM and SGLang use), here once in the gateway so that a bad schema is a 400
before it reaches a worker. The worker enforces the grammar token by token (gateway/worker.py)."""

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
