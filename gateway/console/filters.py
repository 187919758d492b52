"""How the console writes values for people: sizes, durations, rates."""

from __future__ import annotations

from gateway.units import format_bytes


def size(n: int | None) -> str:
    return "—" if n is None else format_bytes(int(n))


def duration(seconds: float | None) -> str:
    """3 s, 4 min 05 s, 2 h 03 min; a dash when unknown."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def rate(bytes_per_second: float | None) -> str:
    return "—" if not bytes_per_second else f"{format_bytes(int(bytes_per_second))}/s"


def percent(part: float | None, whole: float | None) -> int:
    if not part or not whole:
        return 0
    return max(0, min(100, round(100 * part / whole)))


FILTERS = {"size": size, "duration": duration, "rate": rate, "percent": percent}
