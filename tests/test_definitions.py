"""One definition per fact: where two faces or layers need the same thing (a profile's fields,
the usage groupings, byte formatting, the OpenAI error body), they take it from one place, and
these tests check that the places which cannot share code (a migration, the CLI's options)
agree with it. In-process and quick: no server, no model."""

from __future__ import annotations

from gateway.units import format_bytes


def test_byte_counts_read_one_way() -> None:
    assert [format_bytes(n) for n in (0, 512, 1023)] == ["0 B", "512 B", "1023 B"]
    assert format_bytes(64 * 1024) == "64.0 KiB"
    assert format_bytes(3 * 2**20 // 2) == "1.5 MiB"
    assert format_bytes(12 * 2**30) == "12.0 GiB"
    assert format_bytes(2 * 2**40) == "2.0 TiB"
