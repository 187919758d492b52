"""How the console writes values for people: sizes, durations, rates."""

from __future__ import annotations

from gateway.units import format_bytes, format_duration


def size(n: int | None) -> str:
    return "—" if n is None else format_bytes(int(n))


def duration(seconds: float | None) -> str:
    """As the command line writes spans (45s, 3m20s, 2h05m); a dash when unknown."""
    return "—" if seconds is None else format_duration(seconds)


def rate(bytes_per_second: float | None) -> str:
    return "—" if not bytes_per_second else f"{format_bytes(int(bytes_per_second))}/s"


def percent(part: float | None, whole: float | None) -> int:
    if not part or not whole:
        return 0
    return max(0, min(100, round(100 * part / whole)))


FILTERS = {"size": size, "duration": duration, "rate": rate, "percent": percent}
