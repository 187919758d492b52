"""Hostile input on a real server: NaN and Infinity, huge numbers, deep nesting, oversized and
duplicate profile fields, bad rows already in the database. Each is a 4xx in the protocol's own
shape (OpenAI error JSON over HTTP, a tool error over MCP), never a 500, and nothing is saved."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Models
from tests.server import Server, start_server
from tests.test_mcp import call, error

HELLO = [{"role": "user", "content": "hello world"}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def srv(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("input") / "home"
    server = start_server(home, models.env(home))
    yield server
    server.stop()


def post(srv: Server, path: str, body: bytes | str, method: str = "POST") -> httpx.Response:
    return httpx.request(method, srv.url + path, content=body, headers=JSON, timeout=60)


def refused(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    """The OpenAI-shaped error of a refused request."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    return err


def profile_names(srv: Server) -> set[str]:
    r = httpx.get(srv.url + "/admin/profiles", timeout=30)
    assert r.status_code == 200, r.text
    return {p["name"] for p in r.json()["data"]}


# NaN and Infinity --------------------------------------------------------------------------


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/profiles", '{"name": "inf", "model": "tiny-a", "ttl": %s}'),
        ("POST", "/admin/profiles", '{"name": "inf", "model": "tiny-a", "extra": [1, %s]}'),
        ("POST", "/v1/chat/completions", '{"model": "tiny-a", "messages": [], "temperature": %s}'),
        ("POST", "/v1/completions", '{"model": "tiny-a", "prompt": "x", "top_p": %s}'),
        ("POST", "/admin/load", '{"model": "tiny-a", "x": {"y": %s}}'),
    ],
)
def test_nan_and_infinity_are_refused_in_every_json_body(
    srv: Server, method: str, path: str, body: str, constant: str
) -> None:
    err = refused(post(srv, path, body % constant, method))
    assert constant in err["message"] and "JSON" in err["message"]
    if constant == "Infinity":  # a number too large for a float reads as Infinity
        err = refused(post(srv, path, body % "1e999", method))
        assert "1e999" in err["message"]
    assert "inf" not in profile_names(srv)  # nothing saved, and the listing still answers


def test_infinity_in_a_profile_update_changes_nothing(srv: Server) -> None:
    post(srv, "/admin/profiles", json.dumps({"name": "upd-inf", "model": "tiny-a", "ttl": 60}))
    err = refused(post(srv, "/admin/profiles/upd-inf", '{"ttl": Infinity}', "PATCH"))
    assert "Infinity" in err["message"]
    assert httpx.get(srv.url + "/admin/profiles/upd-inf").json()["ttl"] == 60


# Bounds of every profile field -------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 10**30),
        ("context_length", 10**30),
        ("max_tokens", 2**63),
        ("ttl", 1e300),
        ("ttl", -1),
        ("temperature", 1e308),
        ("top_p", -0.5),
        ("name", "n" * 129),
        ("model", "m" * 4097),
        ("aliases", [f"a{i}" for i in range(33)]),
        ("aliases", ["x" * 129]),
        ("system_prompt", "s" * (256 * 1024 + 1)),
        ("description", "d" * 4097),
        ("pinned", "maybe"),
    ],
)
def test_profile_fields_are_bounded(srv: Server, field: str, value: Any) -> None:
    body = {"name": "bounded", "model": "tiny-a", field: value}
    err = refused(post(srv, "/admin/profiles", json.dumps(body)))
    assert err["param"].split(".")[0] == field
    assert "bounded" not in profile_names(srv)


def test_profile_fields_at_their_limits_are_accepted(srv: Server) -> None:
    body = {
        "name": "l" * 128,
        "model": "tiny-a",
        "aliases": [f"limit-{i}" for i in range(32)],
        "system_prompt": "s" * (256 * 1024),
        "description": "d" * 4096,
        "max_tokens": 2**24,
        "context_length": 2**24,
        "ttl": 365 * 24 * 3600,
    }
    r = post(srv, "/admin/profiles", json.dumps(body))
    assert r.status_code == 201, r.text
    assert httpx.delete(srv.url + "/admin/profiles/" + "l" * 128).status_code == 200


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"context_length": 10**30}, "context_length"),
        ({"ttl": 1e308}, "ttl"),
        ({"system_prompt": "s" * (256 * 1024 + 1)}, "system_prompt"),
        ({"aliases": ["twice", "twice"]}, "aliases"),
    ],
)
def test_mcp_profile_fields_are_bounded(srv: Server, args: dict, fragment: str) -> None:
    message = error(srv.url + "/mcp", "create_profile", name="mcp-bounded", model="tiny-a", **args)
    assert fragment in message and message != "Error executing tool create_profile"
    assert "mcp-bounded" not in profile_names(srv)


def test_duplicate_aliases_are_refused(srv: Server) -> None:
    body = {"name": "dups", "model": "tiny-a", "aliases": ["same", "other", "same"]}
    err = refused(post(srv, "/admin/profiles", json.dumps(body)))
    assert err["param"] == "aliases" and "same" in err["message"]
    assert "dups" not in profile_names(srv)
    # Across profiles: an alias may be neither another profile's alias nor its name.
    first = {"name": "owner", "model": "tiny-a", "aliases": ["taken"]}
    assert post(srv, "/admin/profiles", json.dumps(first)).status_code == 201
    for alias in ("taken", "owner"):
        second = {"name": "thief", "model": "tiny-a", "aliases": [alias]}
        err = refused(post(srv, "/admin/profiles", json.dumps(second)), 409)
        assert err["param"] == "aliases" and "owner" in err["message"]
    assert "thief" not in profile_names(srv)


# Deep nesting -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [150, 5_000, 10_000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/profiles"])
def test_deeply_nested_bodies_are_refused(srv: Server, path: str, depth: int) -> None:
    nested = '{"a": ' * depth + "1" + "}" * depth
    err = refused(post(srv, path, '{"model": "tiny-a", "x": ' + nested + "}"))
    assert "nested" in err["message"]


def test_deeply_nested_response_format_schema_is_refused(srv: Server) -> None:
    # Written as text: json.dumps itself cannot nest this deep.
    level = '{"type": "object", "properties": {"a": '
    schema = level * 900 + '{"type": "string"}' + "}}" * 900
    body = (
        '{"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], '
        '"response_format": {"type": "json_schema", "json_schema": {"schema": ' + schema + "}}}"
    )
    err = refused(post(srv, "/v1/chat/completions", body))
    assert "nested" in err["message"]


def test_grammar_refuses_schemas_too_deep_to_compile() -> None:
    """The gateway's own depth limit comes first over HTTP; the grammar still turns a schema
    it cannot walk into a 400 rather than a RecursionError."""
    from gateway.engine.grammar import grammar_for
    from gateway.errors import InvalidRequest

    schema: dict[str, Any] = {"type": "string"}
    for _ in range(900):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(InvalidRequest) as e:
        grammar_for({"type": "json_schema", "json_schema": {"schema": schema}})
    assert e.value.param == "response_format"


# MCP chat takes the /v1 schema's bounds ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 1e308}, "temperature"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_mcp_chat_arguments_follow_the_v1_schema(srv: Server, args: dict, field: str) -> None:
    message = error(srv.url + "/mcp", "chat", model="tiny-a", messages=HELLO, **args)
    assert field in message


# Rows already in the database --------------------------------------------------------------


def test_bad_rows_in_the_database_are_reported_not_a_500(srv: Server) -> None:
    """Rows written before these checks existed (ttl=Infinity, a broken alias list) show in the
    listing with what is wrong with them, and can be fixed or deleted."""
    with sqlite3.connect(srv.home / "mlx-manager.db") as db:
        db.executemany(
            "INSERT INTO profiles (name, model, aliases, ttl, pinned) VALUES (?, ?, ?, ?, 0)",
            [
                ("bad-ttl", "tiny-a", "[]", float("inf")),
                ("bad-aliases", "tiny-a", "not json", None),
            ],
        )
    try:
        r = httpx.get(srv.url + "/admin/profiles", timeout=30)
        assert r.status_code == 200, r.text
        rows = {p["name"]: p for p in r.json()["data"]}
        assert "ttl" in rows["bad-ttl"]["error"] and rows["bad-ttl"]["ttl"] is None
        assert "aliases" in rows["bad-aliases"]["error"]
        one = httpx.get(srv.url + "/admin/profiles/bad-ttl", timeout=30)
        assert one.status_code == 200 and "ttl" in one.json()["error"]
        assert {"bad-ttl", "bad-aliases"} <= {
            p["name"] for p in call(srv.url + "/mcp", "list_profiles")["profiles"]
        }
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200
        # A good value replaces the bad one.
        fixed = post(srv, "/admin/profiles/bad-ttl", '{"ttl": 60}', "PATCH")
        assert fixed.status_code == 200, fixed.text
        assert fixed.json()["ttl"] == 60 and "error" not in fixed.json()
    finally:
        for name in ("bad-ttl", "bad-aliases"):
            assert httpx.delete(srv.url + "/admin/profiles/" + name).status_code == 200
