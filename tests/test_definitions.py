"""One definition per fact: where faces or layers need the same thing (a profile's fields, the
usage groupings, byte formatting, the OpenAI error body), they take it from one place; these
tests check the derivations, and that what cannot share code (a migration's columns) agrees.
In-process and quick: no server, no model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from config.settings import load_settings
from config.store import Store
from gateway.catalog.profiles import FIELDS, Profile, tool_parsers
from gateway.cli import build_parser, main
from gateway.cli.profiles import given_fields
from gateway.errors import ModelNotFound, error_body, from_body
from gateway.service.service import USAGE_GROUPS, Service
from gateway.units import format_bytes
from mcp_tools.server import build_mcp

# Every profile field set to something other than its default.
EVERY_FIELD = {
    "model": "org/model",
    "aliases": ["a", "b"],
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 7,
    "context_length": 512,
    "system_prompt": "Be brief.",
    "ttl": 1.5,
    "pinned": True,
    "description": "a test profile",
    "reasoning_format": "inline",
    "tool_parser": tool_parsers()[0],
    "thinking": False,  # stored as 0: it must read back as False, not None or 0
    "reasoning_budget": 64,
    "pooling": "last",
    "rerank": "yes_no",
}


def test_every_profile_field_is_in_the_fixture() -> None:
    assert set(EVERY_FIELD) == set(FIELDS) == set(Profile.model_fields) - {"name"}


def test_cli_profile_options_are_the_profile_fields() -> None:
    line = ["profiles", "create", "p", "--model", "org/model", "--alias", "a", "--alias", "b"]
    line += ["--temperature", "0.5", "--top-p", "0.9", "--max-tokens", "7"]
    line += ["--context-length", "512", "--system-prompt", "Be brief.", "--ttl", "1.5"]
    line += ["--pinned", "--description", "a test profile", "--reasoning-format", "inline"]
    line += ["--tool-parser", str(EVERY_FIELD["tool_parser"])]
    line += ["--no-thinking", "--reasoning-budget", "64"]
    line += ["--pooling", "last", "--rerank", "yes_no"]
    assert given_fields(build_parser().parse_args(line)) == EVERY_FIELD
    # Left out: None, "leave it as it is"; --no-pinned is a value.
    unpinned = build_parser().parse_args(["profiles", "update", "p", "--no-pinned"])
    assert given_fields(unpinned) == {"pinned": False}


def test_cli_profile_help_is_the_field_descriptions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        main(["profiles", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name in FIELDS:
        assert Profile.model_fields[name].description in shown, name
    assert "--reasoning-format {separate,inline}" in shown


def test_the_store_has_a_column_per_profile_field(tmp_path: Path) -> None:
    """The profiles table comes from migrations (history, spelled as it was): a field added to
    Profile needs a migration adding its column, or saving any profile fails."""
    store = Store(tmp_path / "db.sqlite")
    assert {"name", *FIELDS} <= set(store.db.table("profiles").columns_dict)
    store.save_profile(Profile(name="p", **EVERY_FIELD).model_dump())
    saved = store.profile("p")
    assert saved is not None and {k: saved[k] for k in FIELDS} == EVERY_FIELD
    assert saved["thinking"] is False and saved["pinned"] is True  # not 0 and 1


def test_usage_groupings_come_from_the_service(tmp_path: Path) -> None:
    for by in USAGE_GROUPS:
        assert build_parser().parse_args(["usage", "--by", by]).by == by
    with pytest.raises(SystemExit):
        build_parser().parse_args(["usage", "--by", "colour"])

    async def tool_schema() -> dict[str, Any]:
        service = Service(load_settings({"home": str(tmp_path)}, environ={}))
        try:
            async with Client(build_mcp(service)) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}
        finally:
            await service.close()
        return tools["usage_stats"].input_schema

    assert asyncio.run(tool_schema())["properties"]["by"]["enum"] == list(USAGE_GROUPS)


def test_byte_counts_read_one_way() -> None:
    assert [format_bytes(n) for n in (0, 512, 1023)] == ["0 B", "512 B", "1023 B"]
    assert format_bytes(64 * 1024) == "64.0 KiB"
    assert format_bytes(3 * 2**20 // 2) == "1.5 MiB"
    assert format_bytes(12 * 2**30) == "12.0 GiB"
    assert format_bytes(2 * 2**40) == "2.0 TiB"


def test_the_error_body_is_openais_and_reads_back() -> None:
    assert error_body("Gone.", "server_error") == {
        "error": {"message": "Gone.", "type": "server_error", "param": None, "code": None}
    }
    error = ModelNotFound("No such model.", param="model")
    assert error.body() == error_body("No such model.", error.type, "model", "model_not_found")
    back = from_body(404, json.dumps(error.body()).encode())
    assert type(back) is ModelNotFound and back.param == "model"
