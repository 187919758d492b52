"""API keys on a real server: made with the CLI while it runs, required everywhere but /health
once one exists, revoked at once; the constant-time check; the refusal to bind beyond loopback
without a key."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from config.settings import load_settings
from config.store import Store
from gateway.service.keys import ApiKeys, is_loopback
from tests.conftest import Models
from tests.raw_http import exchange
from tests.server import ROOT, Server, free_port, start_server
from tests.test_cli import as_json, cli

HELLO = [{"role": "user", "content": "hello world"}]


def _status(server: Server, path: str, **headers: str) -> int:
    return httpx.get(server.url + path, headers=headers, timeout=30).status_code


def _mcp_tools(server: Server, key: str | None) -> list[str]:
    async def main() -> list[str]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            transport = streamable_http_client(server.url + "/mcp", http_client=http)
            async with Client(transport, cache=None) as client:
                return [t.name for t in (await client.list_tools()).tools]

    return asyncio.run(main())


def test_keys_made_while_the_server_runs_are_required_then_revoked(
    models: Models, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = models.env(home)
    server = start_server(home, env)
    env["MLX_MANAGER_PORT"] = str(server.port)
    try:
        # No key yet: open, as a local tool is expected to be.
        assert _status(server, "/v1/models") == 200

        made = as_json(env, "keys", "create", "--name", "alice")
        alice = made["key"]
        assert made["name"] == "alice" and alice.startswith("mlxm-") and len(alice) > 40
        bob = as_json(env, "keys", "create", "--name", "bob")["key"]

        # Only hashes are stored.
        with sqlite3.connect(home / "mlx-manager.db") as db:
            rows = db.execute("SELECT * FROM api_keys").fetchall()
        assert all(alice not in str(value) for row in rows for value in row)
        stored = {r[0]: r[1] for r in rows}
        assert stored["alice"] == hashlib.sha256(alice.encode()).hexdigest()

        # Every route but /health and /openapi.json now needs a key, at once.
        assert _status(server, "/health") == 200
        assert _status(server, "/openapi.json") == 200
        for path in ("/v1/models", "/admin/workers", "/admin/profiles", "/no/such/path"):
            assert _status(server, path) == 401, path
        r = httpx.get(server.v1 + "/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        missing = httpx.get(server.v1 + "/models").json()["error"]
        assert "Missing API key" in missing["message"] and missing["type"]

        # The OpenAI SDK: a wrong key is an AuthenticationError, the right one works.
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0).models.list()
        sdk = openai.OpenAI(base_url=server.v1, api_key=alice, max_retries=0, timeout=60)
        reply = sdk.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=3)
        assert reply.usage.completion_tokens >= 1
        # x-api-key works too, and Bearer is case-insensitive.
        assert _status(server, "/v1/models", **{"x-api-key": bob}) == 200
        assert _status(server, "/v1/models", Authorization=f"bearer {bob}") == 200

        # MCP: refused before any session, served with the key.
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        r = httpx.post(server.url + "/mcp", json=init, headers={"Accept": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "chat" in _mcp_tools(server, bob)

        # The local CLI reaches the server through the token file the server left.
        ps = cli(env, "ps")
        assert ps.returncode == 0 and "tiny-a" in ps.stdout, ps.stderr

        # last_used is recorded; revoking is immediate.
        listed = {k["name"]: k for k in as_json(env, "keys", "list")}
        assert listed["alice"]["last_used"] is not None
        assert "key" not in listed["alice"] and "hash" not in listed["alice"]
        assert as_json(env, "keys", "revoke", "alice")["revoked"] is True
        assert _status(server, "/v1/models", Authorization=f"Bearer {alice}") == 401
        assert _status(server, "/v1/models", Authorization=f"Bearer {bob}") == 200
        again = cli(env, "keys", "revoke", "alice")
        assert again.returncode == 1 and "No key named 'alice'" in again.stderr
        dup = cli(env, "keys", "create", "--name", "bob")
        assert dup.returncode == 1 and "exists already" in dup.stderr
        bad = cli(env, "keys", "create", "--name", "no spaces")
        assert bad.returncode == 1 and "Invalid key name" in bad.stderr
    finally:
        server.stop()
    assert not (home / f"server-{server.port}.token").exists()


def test_key_from_the_environment(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = "a-long-shared-secret-for-a-simple-setup"
    server = start_server(home, models.env(home, api_key=key))
    try:
        assert _status(server, "/v1/models") == 401
        assert _status(server, "/v1/models", Authorization=f"Bearer {key}") == 200
        assert _status(server, "/v1/models", Authorization=f"Bearer {key}x") == 401
        # The CLI, given the same environment, sends it.
        env = models.env(home, api_key=key, port=str(server.port))
        assert cli(env, "ps").returncode == 0
    finally:
        server.stop()


def test_the_check_compares_every_key_whatever_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings({"home": str(tmp_path)}, environ={"MLX_MANAGER_API_KEY": "env-k"})
    keys = ApiKeys(Store(settings.db_path), settings)
    made = {name: keys.create(name)["key"] for name in ("a", "b", "c")}
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(x: Any, y: Any) -> bool:
        calls.append((len(x), len(y)))
        return real(x, y)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    presented = [made["a"], made["c"], "env-k", "wrong", "", made["b"][:-1], made["b"] * 50]
    results = []
    counts = []
    for key in presented:
        calls.clear()
        results.append(keys.check(key))
        counts.append(len(calls))
        # Always digests of equal length: a key's length does not change the comparison.
        assert {c for c in calls} == {(32, 32)}
    assert results == ["a", "c", "env", None, None, None, None]
    assert counts == [4] * len(presented)  # all 3 stored keys and the env key, every time


def test_checking_a_key_runs_no_query_until_the_keys_change(tmp_path: Path) -> None:
    """Auth runs on every request: it reads the key table only when the database changed
    (a key made or revoked by another process applies at once), never on a request's path."""
    settings = load_settings({"home": str(tmp_path)}, environ={})
    store = Store(settings.db_path)
    keys = ApiKeys(store, settings)
    made = keys.create("a")["key"]
    assert keys.check(made) == "a"  # the table is read once
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    for _ in range(50):
        assert keys.required() and keys.check(made) == "a" and keys.check("nope") is None
    assert not statements, statements
    other = ApiKeys(Store(settings.db_path), settings)  # `keys create` in another process
    later = other.create("b")["key"]
    statements.clear()
    assert keys.check(later) == "b"  # at once
    assert any("api_keys" in s for s in statements)  # read again, once
    statements.clear()
    for _ in range(20):
        keys.check(later)
    assert not statements


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "no-such-host.invalid"):
        assert not is_loopback(host), host


def _serve(home: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_binding_beyond_loopback_needs_a_key(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = models.env(home)
    port = str(free_port())
    refused = _serve(home, env, "--host", "0.0.0.0", "--port", port)
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2
    assert "Refusing to listen on 0.0.0.0 without an API key" in out
    assert "mlx-manager keys create --name NAME" in out and "--insecure-no-auth" in out

    # Knowingly open: it starts (and says that no key is required).
    server = start_server(home, env, "--host", "0.0.0.0", "--insecure-no-auth")
    try:
        assert _status(server, "/v1/models") == 200
    finally:
        server.stop()
    assert "no API key required" in server.log.read_text()

    # With a key, it starts and requires it.
    assert cli(env, "keys", "create", "--name", "lan").returncode == 0
    server = start_server(home, env, "--host", "0.0.0.0")
    try:
        assert _status(server, "/v1/models") == 401
        assert _status(server, "/v1/models", **server.headers) == 200
    finally:
        server.stop()


def test_keys_are_read_whatever_whitespace_surrounds_them(models: Models, tmp_path: Path) -> None:
    """Authorization is a scheme, then one or more spaces or tabs, then the token (RFC 7235);
    x-api-key is trimmed as the Bearer token is. Raw sockets: httpx refuses such values."""
    home = tmp_path / "home"
    key = "a-long-shared-secret-for-whitespace"
    server = start_server(home, models.env(home, api_key=key))
    try:
        accepted = [
            {"Authorization": f"Bearer\t{key}"},
            {"Authorization": f"Bearer \t  {key}"},
            {"Authorization": f"bearer {key}\t"},
            {"x-api-key": f"{key} "},
            {"x-api-key": f"{key}\t"},
            {"x-api-key": f"\t{key}"},
        ]
        for headers in accepted:
            reply = exchange(server.port, "GET", "/v1/models", headers)
            assert reply.status == 200, (headers, reply.body)
        refused = [
            {"Authorization": f"Bearer{key}"},  # no separator: not the Bearer scheme
            {"Authorization": "Bearer \t "},
            {"x-api-key": f"{key} x"},
        ]
        for headers in refused:
            reply = exchange(server.port, "GET", "/v1/models", headers)
            assert reply.status == 401, (headers, reply.body)
        # A tab after the scheme names the key as wrong, not as missing.
        wrong = exchange(server.port, "GET", "/v1/models", {"Authorization": "Bearer\tnope"})
        assert wrong.json()["error"]["message"] == "Invalid API key."
    finally:
        server.stop()
