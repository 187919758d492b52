"""Grammars for constrained decoding, compiled by llguidance (the library llama.cpp, vLLM and
SGLang use) here in the gateway, once per distinct schema: `response_format` (a bad schema is a
400 before it reaches a worker) and the shape of a JSON tool call. The worker enforces them token
by token (gateway/engine/logits.py)."""

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
        grammar = LLMatcher.grammar_from_json_schema(
            json.dumps(schema),
            overrides=_OPTIONS,  # type: ignore[arg-type]
        )
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
    model opens one. A tool whose parameters cannot be compiled is a 400 naming it: a worker
    never decodes a call without its grammar."""
    return _tool_call_grammar(json.dumps(tools))  # key order kept: it is the call's order


@lru_cache(maxsize=64)
def _tool_call_grammar(tools_json: str) -> str:
    tools = json.loads(tools_json)
    grammar, error = _call_grammar(tools)
    if error is None:
        return grammar
    for tool in tools:  # find the tool to blame
        _, error = _call_grammar([tool])
        if error is not None:
            raise InvalidRequest(
                f"Tool '{tool['function']['name']}': its parameters are not a JSON schema "
                f"this server can enforce: {error}",
                param="tools",
            )
    raise InvalidRequest(f"The tools' parameters cannot be enforced together: {error}")


def _call_grammar(tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The grammar of a call to one of `tools`, and why it cannot be enforced (None: it can).

    Each tool's parameters move under the root's `$defs`, their own `$ref`s rebased to match:
    nested under the call's `arguments`, a `#/$defs/...` reference (what pydantic writes for
    every enum and nested model) would point at nothing."""
    from llguidance import LLMatcher

    defs: dict[str, Any] = {}
    branches = []
    for i, t in enumerate(tools):
        key = f"tool{i}"
        params = dict(t["function"].get("parameters") or {"type": "object"})
        params.pop("$id", None)  # its refs now resolve against the combined document
        defs[key] = _rebased(params, f"/$defs/{key}")
        branches.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "arguments": {"$ref": f"#/$defs/{key}"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = {"$defs": defs, "anyOf": branches}
    # Free whitespace would let a model pad a call forever. Lenient: a keyword llguidance
    # cannot enforce (Claude Code's tools use `propertyNames`) is left unenforced rather than
    # refusing every request that offers the tool; the call is still JSON of that shape.
    layout = {
        "whitespace_flexible": False,
        "item_separator": ", ",
        "key_separator": ": ",
        "lenient": True,
    }
    try:
        grammar = LLMatcher.grammar_from_json_schema(
            json.dumps(schema),
            overrides=layout,  # type: ignore[arg-type]
        )
    except (ValueError, TypeError) as e:
        return "", str(e)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return grammar, ("; ".join(messages) or "invalid schema") if failed else None


# Keywords whose values are data (a `$ref` key there is not a reference), and keywords whose
# values map names (which may be anything, "enum" included) to schemas.
_DATA = frozenset({"const", "enum", "default", "examples"})
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with each local `$ref` (`#`, `#/...`) pointing into `base`, the JSON pointer
    the schema now sits at. Recursive references keep working: they point at it again."""
    if isinstance(schema, list):
        return [_rebased(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + base + value[1:]
        elif key in _DATA:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rebased(s, base) for name, s in value.items()}
        else:
            out[key] = _rebased(value, base)
    return out
