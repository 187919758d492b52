"""What the CLI prints for people: aligned tables, and each value as a person reads it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.units import format_bytes


def table(result: Any) -> str:
    """Rows of dicts as an aligned table; anything else as key: value lines."""
    rows = result if isinstance(result, list) else None
    if rows is None:
        return "\n".join(f"{k}: {v}" for k, v in result.items())
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def size(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def duration(seconds: float | None) -> str:
    """45s, 3m20s, 2h05m, 3d4h: as `ps` and `docker ps` show ages."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


Column = tuple[str, Callable[[Any], str]]  # (heading, how a person reads the field)


def shown(rows: list[dict[str, Any]], columns: dict[str, Column]) -> list[dict[str, str]]:
    """Rows as a person reads them: each field under its heading, in its own format."""
    return [{heading: show(r.get(f)) for f, (heading, show) in columns.items()} for r in rows]
