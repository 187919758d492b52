"""Web pages cannot drive the server: a foreign Host (DNS rebinding) or Origin (a cross-site
request) is refused on every route, a body not sent as JSON is refused, and a page served from
the server itself, an origin the settings allow, and clients that send no Origin all work."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from config.settings import SettingsError, load_settings
from tests.conftest import Models
from tests.server import Server, start_server

APP = "http://app.example:3000"  # the origin the test server allows (MLX_MANAGER_ALLOWED_ORIGINS)
PROFILE = {"name": "csrf", "model": "tiny-b", "system_prompt": "injected"}
HELLO = [{"role": "user", "content": "hello world"}]
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def guarded(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("cross-site") / "home"
    server = start_server(home, models.env(home, allowed_origins=APP))
    yield server
    server.stop()


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] and error["message"], error
    return error


def _profiles(server: Server) -> list[str]:
    return [p["name"] for p in httpx.get(server.url + "/admin/profiles").json()["data"]]


def test_the_reported_cross_site_post_is_refused(guarded: Server) -> None:
    # The issue's own request: a page at evil.example rebinding its name to this server.
    r = httpx.post(
        guarded.url + "/admin/profiles",
        headers={
            "Host": f"evil.example:{guarded.port}",
            "Origin": "http://evil.example",
            "content-type": "text/plain",
        },
        content=b'{"name":"csrf","model":"tiny-b","system_prompt":"injected"}',
    )
    error = _error(r, 403, "host_not_allowed")
    assert "evil.example" in error["message"] and "MLX_MANAGER_ALLOWED_HOSTS" in error["message"]
    assert "csrf" not in _profiles(guarded)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "max_tokens": 1}),
        ("POST", "/admin/profiles", PROFILE),
        ("POST", "/admin/load", {"model": "tiny-a"}),
        ("DELETE", "/admin/profiles/csrf", None),
        ("POST", "/mcp", INIT),
        ("GET", "/no/such/path", None),
    ],
)
def test_foreign_hosts_and_origins_are_refused_everywhere(
    guarded: Server, method: str, path: str, body: Any
) -> None:
    def send(**headers: str) -> httpx.Response:
        return httpx.request(
            method, guarded.url + path, json=body, headers={**MCP_HEADERS, **headers}, timeout=30
        )

    # DNS rebinding: the browser sends the attacker's name as Host, and no Origin on a GET.
    error = _error(send(Host=f"evil.example:{guarded.port}"), 403, "host_not_allowed")
    assert "MLX_MANAGER_ALLOWED_HOSTS" in error["message"]
    # A cross-site request: the right Host, a foreign Origin; other ports of this machine are
    # other origins too (another local web app).
    for origin in ("http://evil.example", f"http://localhost:{guarded.port + 1}", "null"):
        error = _error(send(Origin=origin), 403, "origin_not_allowed")
        assert origin in error["message"] and "MLX_MANAGER_ALLOWED_ORIGINS" in error["message"]
    assert "csrf" not in _profiles(guarded)
    assert not guarded.workers()  # /admin/load did not run


def test_bodies_must_be_sent_as_json(guarded: Server) -> None:
    body = b'{"name":"csrf","model":"tiny-b","system_prompt":"injected"}'
    # What a page can send without a CORS preflight: text/plain, a form, or no type at all
    # (fetch with a Blob body); and any other type a client may send by mistake.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None, "text/json"):
        headers = {"content-type": content_type} if content_type else {}
        for path in ("/admin/profiles", "/v1/chat/completions", "/admin/load"):
            r = httpx.post(guarded.url + path, content=body, headers=headers)
            error = _error(r, 415, "unsupported_media_type")
            assert "application/json" in error["message"], error
    assert "csrf" not in _profiles(guarded)
    # A charset parameter is fine, and so is an upper-case type.
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(
            guarded.url + "/admin/profiles",
            content=body.replace(b"csrf", b"typed"),
            headers={"content-type": content_type},
        )
        assert r.status_code == 201, r.text
        assert httpx.delete(guarded.url + "/admin/profiles/typed").status_code == 200
    # No body where none is needed: unaffected; a missing body is still a plain 400.
    assert httpx.delete(guarded.url + "/admin/profiles/none").status_code == 404
    assert httpx.post(guarded.url + "/admin/load").status_code == 400


def test_clients_without_an_origin_and_pages_of_this_server_work(guarded: Server) -> None:
    # SDKs and curl send no Origin.
    sdk = openai.OpenAI(base_url=guarded.v1, api_key="unused", max_retries=0, timeout=60)
    reply = sdk.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    assert httpx.get(guarded.url + "/metrics").status_code == 200
    # A page served by this server (the web console) is same-origin, by any loopback name.
    port = guarded.port
    for host, origin in (
        (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"),
        (f"localhost:{port}", f"http://localhost:{port}"),
        (f"[::1]:{port}", f"http://[::1]:{port}"),
        (f"localhost:{port}", f"http://127.0.0.1:{port}"),
    ):
        headers = {"Host": host, "Origin": origin}
        r = httpx.post(guarded.url + "/admin/profiles", json=PROFILE, headers=headers)
        assert r.status_code == 201, (headers, r.text)
        deleted = httpx.delete(guarded.url + "/admin/profiles/csrf", headers=headers)
        assert deleted.status_code == 200, deleted.text
    # Reached through a forwarded port, the server answers to loopback names on any port.
    assert httpx.get(guarded.url + "/health", headers={"Host": "localhost:9999"}).status_code == 200
    # The mcp client (no Origin) still works.
    assert "chat" in _mcp_tools(guarded.url)


def test_an_allowed_origin_gets_cors_answers(guarded: Server) -> None:
    preflight = httpx.options(
        guarded.url + "/v1/chat/completions",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == APP
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed_headers = preflight.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "x-stainless-os"} <= {
        h.strip() for h in allowed_headers.split(",")
    }
    # The request itself: served, with the headers a browser needs to let the page read it.
    r = httpx.post(
        guarded.v1 + "/chat/completions",
        json={"model": "tiny-a", "messages": HELLO, "max_tokens": 1},
        headers={"Origin": APP},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # An error is readable by the page too.
    r = httpx.get(guarded.v1 + "/models/no-such-model", headers={"Origin": APP})
    assert r.status_code == 404 and r.headers["access-control-allow-origin"] == APP
    # The MCP transport accepts the same origin (one definition for both).
    r = httpx.post(guarded.url + "/mcp", json=INIT, headers={**MCP_HEADERS, "Origin": APP})
    assert r.status_code == 200, r.text
    # A preflight from a foreign origin is refused in our error shape, with no CORS grant.
    refused = httpx.options(
        guarded.url + "/admin/profiles",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    _error(refused, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in refused.headers


def test_any_origin_and_more_hosts_when_set(models: Models, tmp_path: Any) -> None:
    home = tmp_path / "home"
    key = "a-key-that-web-pages-do-not-have"
    env = models.env(
        home, api_key=key, allowed_origins="*", allowed_hosts="llm.example, 10.1.2.3:8443"
    )
    server = start_server(home, env)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        evil = {"Origin": "http://evil.example"}
        # A preflight carries no key: answered all the same.
        preflight = httpx.options(
            server.url + "/admin/profiles",
            headers={**evil, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200, preflight.text
        r = httpx.post(server.url + "/admin/profiles", json=PROFILE, headers={**evil, **auth})
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == "*"
        # Without the key: 401, which the page may read.
        r = httpx.post(server.url + "/admin/profiles", json=PROFILE, headers=evil)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
        r = httpx.post(server.url + "/mcp", json=INIT, headers={**MCP_HEADERS, **evil, **auth})
        assert r.status_code == 200, r.text
        # A name set in MLX_MANAGER_ALLOWED_HOSTS: with or without a port; with a port: that
        # port only.
        for host in ("llm.example", "llm.example:443", "LLM.example:8080", "10.1.2.3:8443"):
            r = httpx.get(server.url + "/v1/models", headers={"Host": host, **auth})
            assert r.status_code == 200, (host, r.text)
        # A foreign Host is refused before the key is looked at: a page learns nothing.
        for host in ("evil.example", "10.1.2.3:8080", "10.1.2.3"):
            r = httpx.get(server.url + "/v1/models", headers={"Host": host})
            _error(r, 403, "host_not_allowed")
        # Still no DNS rebinding, whatever the origin.
        r = httpx.post(
            server.url + "/mcp",
            json=INIT,
            headers={**MCP_HEADERS, **auth, "Host": f"evil.example:{server.port}"},
        )
        _error(r, 403, "host_not_allowed")
    finally:
        server.stop()


def test_default_hosts_follow_the_bound_address(tmp_path: Any) -> None:
    from gateway.http.origins import host_policy

    def policy(host: str = "127.0.0.1", **env: str) -> Any:
        environ = {"MLX_MANAGER_HOME": str(tmp_path), **env}
        return host_policy(load_settings({"host": host, "port": 8080}, environ=environ))

    loopback = policy()
    assert loopback.host_allowed("localhost:8080") and loopback.host_allowed("127.0.0.1:1234")
    assert not loopback.host_allowed(f"{socket.gethostname()}:8080")
    assert loopback.origin_allowed("http://localhost:8080")
    assert not loopback.origin_allowed("http://localhost:3000")
    security = loopback.transport_security()
    assert security.enable_dns_rebinding_protection
    assert "http://localhost:8080" in security.allowed_origins
    # Bound to every address: this machine's names and addresses are its own too.
    every = policy("0.0.0.0")
    assert every.host_allowed(f"{socket.gethostname().lower()}:8080")
    assert every.origin_allowed(f"http://{socket.gethostname().lower()}:8080")
    assert not every.host_allowed("evil.example:8080")
    # One address: that address.
    lan = policy("192.0.2.7")
    assert lan.host_allowed("192.0.2.7:8080") and lan.origin_allowed("https://192.0.2.7:8080")
    # Pages served under a name set in MLX_MANAGER_ALLOWED_HOSTS are same-origin.
    proxied = policy(MLX_MANAGER_ALLOWED_HOSTS="llm.example,10.1.2.3:8443")
    assert proxied.origin_allowed("https://llm.example")
    assert proxied.origin_allowed("http://llm.example:8000")
    assert proxied.origin_allowed("http://10.1.2.3:8443")
    assert not proxied.origin_allowed("http://10.1.2.3")
    assert not proxied.origin_allowed("http://evil.example")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALLOWED_ORIGINS", "evil.example"),  # an origin has a scheme
        ("ALLOWED_ORIGINS", "http://app.example/path"),
        ("ALLOWED_HOSTS", "http://llm.example"),  # a host has none
        ("ALLOWED_HOSTS", "llm.example:port"),
    ],
)
def test_bad_host_and_origin_settings_stop_startup(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name.lower()):
        load_settings(environ={"MLX_MANAGER_HOME": "/nonexistent", f"MLX_MANAGER_{name}": value})


def _mcp_tools(url: str) -> list[str]:
    async def main() -> list[str]:
        async with httpx2.AsyncClient(timeout=30) as http:
            transport = streamable_http_client(url + "/mcp", http_client=http)
            async with Client(transport, cache=None) as client:
                return [t.name for t in (await client.list_tools()).tools]

    return asyncio.run(main())
