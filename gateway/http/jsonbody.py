"""Strict JSON for what clients send. Python's json module accepts NaN, Infinity and -Infinity,
which JSON does not have: they passed validation and ended as 500s or as rows no response could
serialize. And a body nested thousands of levels deep overflows the parser's recursion, or the
recursion of whatever walks it later (re-serializing a schema, compiling a grammar)."""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 100  # objects and arrays inside each other; real requests stay far below


class JSONError(ValueError):
    """Text that is not JSON, or JSON this server refuses; the message says why."""


def _refuse_constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON value (send a finite number or null)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as Infinity
        raise JSONError(f"the number {text[:40]} is too large")
    return value


def loads(text: str | bytes) -> Any:
    """Parse JSON, refusing NaN/Infinity/-Infinity and nesting deeper than MAX_DEPTH."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise JSONError(_too_deep()) from None
    except JSONError:
        raise
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise JSONError(str(e)) from None
    if _deeper_than(value, MAX_DEPTH):
        raise JSONError(_too_deep())
    return value


def _too_deep() -> str:
    return f"it is nested more than {MAX_DEPTH} levels deep"


def _deeper_than(value: Any, limit: int) -> bool:
    """Without recursion: the point is to look before anything recursive does."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
