"""Quantities as people read them, each written one way everywhere: byte counts (`ps`, the
pool's log and its memory errors, the 413 answer) in binary units, as memory is counted, with
one decimal; spans of time as `ps` and `docker ps` show them; moments as a short local time or
an age."""

from __future__ import annotations

from datetime import UTC, datetime

_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n: int) -> str:
    """512 B, 64.0 KiB, 1.5 GiB."""
    for unit, scale in _UNITS:
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_duration(seconds: float) -> str:
    """45s, 3m20s, 2h05m, 3d4h: two units at most, the larger first."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def parse_time(iso: str) -> datetime:
    """An ISO time as the service writes it; one without a zone is UTC (SQLite's own)."""
    moment = datetime.fromisoformat(iso)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(iso: str, now: datetime | None = None) -> str:
    """A moment in local time, as short as it stays clear: 14:03:27 today, Nov 30 14:03 this
    year, 2025-11-30 before."""
    local = parse_time(iso).astimezone()
    today = (now or datetime.now(UTC)).astimezone()
    if local.date() == today.date():
        return local.strftime("%H:%M:%S")
    if local.year == today.year:
        return local.strftime("%b %d %H:%M")
    return local.strftime("%Y-%m-%d")


def format_age(iso: str, now: datetime | None = None) -> str:
    """How long ago: 45s ago, 3m ago, 2h ago, 5d ago; a date past a month."""
    seconds = ((now or datetime.now(UTC)) - parse_time(iso)).total_seconds()
    if seconds < 60:
        return f"{max(0, int(seconds))}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    if seconds < 31 * 86400:
        return f"{int(seconds // 86400)}d ago"
    return parse_time(iso).astimezone().strftime("%Y-%m-%d")
