"""What the CLI prints for people: aligned tables that fit the terminal, and each value as a
person reads it (sizes, spans and moments in gateway/units.py's words). `--json` bypasses all
of it and prints the raw values."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from gateway.units import format_age, format_bytes, format_duration, format_time

Column = tuple[str, Callable[[Any], str]]  # (heading, how a person reads the field)

# Fields that hold a moment: when something happened is best read as an age; a log's time
# column as the local time.
AGES = frozenset({"created", "updated", "last_used", "last_modified"})
TIMES = frozenset({"time", "since", "until"})
# A value's unit, by the suffix of its field's name.
SUFFIXES = ("_bytes", "_seconds", "_ms")

GAP = "  "
ELLIPSIS = "…"
# A column is cut to no fewer characters than this (or its heading's): values this short
# (sizes, spans, dates, numbers) are never cut but as a last resort.
NARROWEST = 10


def table(result: Any, columns: dict[str, Column] | None = None) -> str:
    """Rows of dicts as an aligned table (`columns` picks and formats the fields; by default
    each field under its name, formatted by `human`); anything else as `label: value` lines."""
    if not isinstance(result, list):
        return details(result)
    if not result:
        return "(none)"
    if columns is None:
        columns = {f: (heading(f), _by_name(f)) for f in result[0]}
    return aligned(shown(result, columns), terminal_width())


def details(result: dict[str, Any]) -> str:
    """One field a line, labels aligned (`memory:   545.5 KiB`); a value's next lines start
    under its first."""
    labels = {f: heading(f).lower() + ":" for f in result}
    width = max(map(len, labels.values()), default=0)
    indent = "\n" + " " * (width + 1)
    lines = []
    for f, v in result.items():
        text = indent.join(one_line(part) for part in human(f, v).split("\n"))
        lines.append(f"{labels[f]:<{width}} {text}".rstrip())
    return "\n".join(lines)


def shown(rows: list[dict[str, Any]], columns: dict[str, Column]) -> list[dict[str, str]]:
    """Rows as a person reads them: each field under its heading, in its own format."""
    return [{name: one_line(show(r.get(f))) for f, (name, show) in columns.items()} for r in rows]


def aligned(rows: list[dict[str, str]], width: int | None) -> str:
    """Left-aligned columns two spaces apart; when they would pass `width`, the widest are cut
    down together (each ending in …) until they fit."""
    names = list(rows[0])
    widths = [max(len(n), *(len(r[n]) for r in rows)) for n in names]
    if width is not None:
        fitted = None
        while fitted is None:
            fitted = _fit(widths, [len(n) for n in names], width - len(GAP) * (len(names) - 1))
            if fitted is None:  # too narrow for every heading: the last columns are left out
                names, widths = names[:-1], widths[:-1]
        widths = fitted

    def line(cells: list[str]) -> str:
        return GAP.join(_cut(c, w).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(names), *(line([r[n] for n in names]) for r in rows)])


def _fit(widths: list[int], headings: list[int], room: int) -> list[int] | None:
    """Lower the widest columns to one cap, the highest that makes them all fit in `room`.
    What a column keeps, the first way that fits: the first column whole (it names the row)
    and the others their heading; every column its heading. None if neither fits (but a
    single column always does)."""
    texts = [max(h, min(w, NARROWEST)) for w, h in zip(widths, headings, strict=True)]
    tiers = [[widths[0], *texts[1:]], texts, [min(w, room) for w in widths[:1]]]
    floors = next((t for t in tiers if sum(t) <= room and len(t) == len(widths)), None)
    if floors is None:
        return None
    cap = max(widths)
    while cap > 0 and sum(max(min(w, cap), f) for w, f in zip(widths, floors, strict=True)) > room:
        cap -= 1
    return [max(min(w, cap), f) for w, f in zip(widths, floors, strict=True)]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def terminal_width() -> int | None:
    """The columns to fit: the terminal's (or $COLUMNS). None when printing to a pipe or a
    file with no $COLUMNS: nothing is cut there."""
    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return max(shutil.get_terminal_size().columns, 20)
    return None


def heading(field: str) -> str:
    """A field's name as a heading: size_bytes is SIZE, ttl_remaining_seconds TTL REMAINING."""
    for suffix in SUFFIXES:
        field = field.removesuffix(suffix)
    return field.replace("_", " ").upper()


def _by_name(field: str) -> Callable[[Any], str]:
    return lambda value: human(field, value)


def human(field: str, value: Any) -> str:
    """A value as a person reads it, its format chosen by its field's name and its type."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if field.endswith("_bytes"):
            return size(int(value))
        if field.endswith("_seconds"):
            return duration(value)
        if field.endswith("_ms"):
            return millis(value)
        if field.endswith("per_second"):
            return f"{value:.1f}"
        if field == "parameters":
            return count(value)
        return number(value)
    if isinstance(value, str) and field in AGES | TIMES:
        try:
            return format_age(value) if field in AGES else format_time(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def one_line(text: str) -> str:
    """A cell on one line, with no control character a model's text could smuggle in (terminal
    escapes show as \\x1b)."""
    return "".join(" " if c in "\n\t\r" else c if c.isprintable() else repr(c)[1:-1] for c in text)


def cell(value: Any) -> str:
    """A value with no unit: blank when there is none."""
    return human("", value)


def number(value: float) -> str:
    """12, 0.35, 12.5: no trailing zeros, three decimals at most."""
    return str(value) if isinstance(value, int) else f"{round(value, 3):g}"


def count(n: float) -> str:
    """139.6K, 7.6B: a model's parameters."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def size(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def millis(ms: float | None) -> str:
    """840ms, 2.35s."""
    if ms is None:
        return "-"
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


def age(iso: str | None) -> str:
    return "" if iso is None else format_age(iso)


def moment(iso: str | None) -> str:
    return "" if iso is None else format_time(iso)
