"""Byte counts as people read them, written one way everywhere (`ps`, the pool's log and its
memory errors, the 413 answer): binary units, as memory is counted, with one decimal."""

from __future__ import annotations

_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n: int) -> str:
    """512 B, 64.0 KiB, 1.5 GiB."""
    for unit, scale in _UNITS:
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
