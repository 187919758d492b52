"""The MCP tools through the official `mcp` client: over streamable HTTP against the real server,
and over stdio against `mlx-manager mcp` (with and without a server running)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import METHOD_NOT_FOUND

from tests.agent_model import ASK_THINK, THOUGHT
from tests.conftest import Models
from tests.server import ROOT, Server, free_port, start_server

TOOLS = {
    "list_models",
    "model_info",
    "search_models",
    "download_model",
    "delete_model",
    "list_profiles",
    "get_profile",
    "create_profile",
    "update_profile",
    "delete_profile",
    "list_loaded",
    "load_model",
    "unload_model",
    "chat",
    "system_info",
    "list_downloads",
    "cancel_download",
    "request_log",
    "usage_stats",
    "worker_logs",
}
HELLO = [{"role": "user", "content": "hello world"}]


def session(target: Any, work: Callable[[Client], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with Client(target, cache=None) as client:
            return await work(client)

    return asyncio.run(main())


def call(target: Any, tool: str, **args: Any) -> Any:
    """A tool's structured result; fails the test on a tool error."""
    result = session(target, lambda c: c.call_tool(tool, args))
    assert not result.is_error, result.content[0].text
    return result.structured_content


def error(target: Any, tool: str, **args: Any) -> str:
    """A tool's error message; fails the test if the tool succeeded."""
    result = session(target, lambda c: c.call_tool(tool, args))
    assert result.is_error, result.structured_content
    return result.content[0].text


@pytest.fixture()
def url(server: Server) -> str:
    return server.url + "/mcp"


def test_tools_and_schemas(url: str) -> None:
    tools = {t.name: t for t in session(url, lambda c: c.list_tools()).tools}
    assert set(tools) == TOOLS
    for t in tools.values():
        assert t.description and t.input_schema["type"] == "object"
    create = tools["create_profile"].input_schema
    assert set(create["required"]) == {"name", "model"}
    assert {
        "temperature",
        "top_p",
        "max_tokens",
        "context_length",
        "system_prompt",
        "ttl",
        "pinned",
        "aliases",
        "description",
    } <= set(create["properties"])
    assert "description" in create["properties"]["model"]
    assert tools["update_profile"].input_schema["required"] == ["name"]
    assert set(tools["search_models"].input_schema["properties"]) == {"query", "author", "limit"}


def test_list_models_and_model_info(url: str) -> None:
    models = {m["id"]: m for m in call(url, "list_models")["models"]}
    assert models["tiny-a"]["context_length"] == 2048
    assert models["tiny-a"]["family"] == "llama"
    info = call(url, "model_info", model="tiny-a")
    # hidden 64, 2 layers, 4 heads of 16 (2 for keys and values), MLP 128, vocabulary 512,
    # embeddings and output head separate.
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert info["parameters"] == 2 * 512 * 64 + 2 * layer + 64
    assert (info["family"], info["vocab_size"], info["quantization"]) == ("llama", 512, None)
    assert info["chat_template"] is True and info["fits_memory_budget"] is True
    assert "does not exist" in error(url, "model_info", model="no-such-model")


def test_hub_tools_offline_and_bad_paths(url: str) -> None:
    # The shared test server runs with HF_HUB_OFFLINE=1 (tests/test_hub.py covers the hub).
    assert "HF_HUB_OFFLINE" in error(url, "search_models", query="qwen")
    assert "HF_HUB_OFFLINE" in error(url, "download_model", model="org/x")
    assert "not in the Hugging Face cache" in error(url, "delete_model", model="tiny-a")
    assert "No download job" in error(url, "cancel_download", id="nope")
    assert call(url, "list_downloads") == {"downloads": []}


def test_profile_from_mcp_is_usable_in_v1_with_its_defaults(
    url: str, client: openai.OpenAI, tokenizer_of: Any
) -> None:
    created = call(
        url,
        "create_profile",
        name="mcp-greedy",
        model="tiny-a",
        temperature=0,
        max_tokens=4,
        system_prompt="be brief",
        aliases=["mcp-g"],
    )
    assert created["temperature"] == 0 and created["aliases"] == ["mcp-g"]
    r1 = client.chat.completions.create(model="mcp-greedy", messages=HELLO)
    r2 = client.chat.completions.create(model="mcp-g", messages=HELLO)
    assert r1.choices[0].message.content == r2.choices[0].message.content  # temperature 0
    assert r1.usage.completion_tokens <= 4  # max_tokens
    with_system = [{"role": "system", "content": "be brief"}, *HELLO]
    expected = len(
        tokenizer_of("tiny-a").apply_chat_template(with_system, add_generation_prompt=True)
    )
    assert r1.usage.prompt_tokens == expected  # system_prompt
    # A request still overrides a default.
    assert (
        client.chat.completions.create(
            model="mcp-greedy", messages=HELLO, max_tokens=6
        ).usage.completion_tokens
        <= 6
    )
    assert "mcp-greedy" in {m.id for m in client.models.list()}

    updated = call(url, "update_profile", name="mcp-greedy", max_tokens=2)
    assert (updated["max_tokens"], updated["temperature"]) == (2, 0)  # partial
    assert (
        client.chat.completions.create(model="mcp-greedy", messages=HELLO).usage.completion_tokens
        <= 2
    )
    cleared = call(url, "update_profile", name="mcp-greedy", clear=["system_prompt"])
    assert cleared["system_prompt"] is None and cleared["max_tokens"] == 2
    assert call(url, "get_profile", name="mcp-greedy")["max_tokens"] == 2
    assert "mcp-greedy" in {p["name"] for p in call(url, "list_profiles")["profiles"]}
    call(url, "delete_profile", name="mcp-greedy")
    assert "does not exist" in error(url, "get_profile", name="mcp-greedy")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="mcp-greedy", messages=HELLO)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        # Arguments outside a field's bounds are refused by the tool's own schema (Profile's),
        # which names the field and the bound.
        ({"name": "bad-t", "model": "tiny-a", "temperature": 5}, "temperature\n  Input should"),
        ({"name": "bad-p", "model": "tiny-a", "top_p": 0}, "top_p\n  Input should"),
        ({"name": "bad-m", "model": "no-such-model"}, "no-such-model"),
        ({"name": " spaced ", "model": "tiny-a"}, "name\n  String should match"),
        ({"name": "dup", "model": "tiny-a"}, "already exists"),
        ({"name": "alias-clash", "model": "tiny-a", "aliases": ["dup-alias"]}, "already used"),
    ],
)
def test_profile_errors_name_the_problem(url: str, args: dict, fragment: str) -> None:
    if "dup" not in {p["name"] for p in call(url, "list_profiles")["profiles"]}:
        call(url, "create_profile", name="dup", model="tiny-a", aliases=["dup-alias"])
    before = call(url, "list_profiles")["profiles"]
    assert fragment in error(url, "create_profile", **args)
    assert call(url, "list_profiles")["profiles"] == before  # nothing half-written


def test_update_and_delete_errors(url: str) -> None:
    assert "does not exist" in error(url, "update_profile", name="ghost", temperature=1)
    assert "does not exist" in error(url, "delete_profile", name="ghost")
    call(url, "create_profile", name="upd", model="tiny-a", temperature=0.5)
    assert "temperature\n  Input should" in error(url, "update_profile", name="upd", temperature=-1)
    assert call(url, "get_profile", name="upd")["temperature"] == 0.5
    assert "Cannot clear 'colour'" in error(url, "update_profile", name="upd", clear=["colour"])


def test_load_progress_list_and_unload(url: str, server: Server) -> None:
    async def work(c: Client) -> Any:
        notes: list[tuple[float, str | None]] = []

        async def progress(p: float, total: float | None, message: str | None) -> None:
            notes.append((p, message))

        loaded = await c.call_tool("load_model", {"model": "tiny-d"}, progress_callback=progress)
        return loaded, notes

    loaded, notes = session(url, work)
    assert not loaded.is_error and loaded.structured_content["state"] == "ready"
    assert notes[0][1] == "loading tiny-d" and "ready" in notes[-1][1]
    listed = call(url, "list_loaded")
    row = next(r for r in listed["loaded"] if r["model"] == "tiny-d")
    assert row["state"] == "ready" and row["memory_bytes"] > 0 and "ttl_seconds" in row
    assert listed["budget_bytes"] > 0
    done = call(url, "unload_model", model="tiny-d")
    assert done["was_loaded"] is True
    again = call(url, "unload_model", model="tiny-d")
    assert again["was_loaded"] is False and "not loaded" in again["message"]
    assert "does not exist" in error(url, "load_model", model="no-such-model")


def test_chat_tool(url: str) -> None:
    r = call(url, "chat", model="tiny-a", messages=HELLO, max_tokens=3, temperature=0)
    assert r["usage"]["completion_tokens"] <= 3 and isinstance(r["content"], str)
    assert r["finish_reason"] in ("length", "stop")
    assert "does not exist" in error(url, "chat", model="nope", messages=HELLO)
    assert (
        "validation"
        in error(url, "chat", model="tiny-a", messages=[{"role": "wizard", "content": "x"}]).lower()
    )


def test_chat_tool_returns_reasoning_as_v1_does(url: str, client: openai.OpenAI) -> None:
    """MCP `chat` takes the one generation path: the reasoning /v1 gives in reasoning_content
    comes back in its own field, apart from the content, with the same usage."""
    r = call(url, "chat", model="tiny-agent", messages=ASK_THINK, temperature=0, max_tokens=200)
    v1 = client.chat.completions.create(
        model="tiny-agent", messages=ASK_THINK, temperature=0, max_tokens=200
    )
    assert r["reasoning"] == THOUGHT == v1.choices[0].message.model_extra["reasoning_content"]
    assert r["content"] == v1.choices[0].message.content and THOUGHT not in r["content"]
    assert r["usage"]["completion_tokens"] == v1.usage.completion_tokens
    assert r["usage"]["prompt_tokens"] == v1.usage.prompt_tokens
    assert r["usage"]["reasoning_tokens"] > 0


def test_system_info(url: str) -> None:
    info = call(url, "system_info")
    assert info["memory_total_bytes"] > info["memory_available_bytes"] > 0
    assert info["mlx_version"] == version("mlx") and info["mlx_lm_version"] == version("mlx-lm")
    assert info["mlx_backend"] == ("cpu" if sys.platform == "linux" else "metal (gpu)")
    assert info["memory_budget"]["budget_bytes"] > 0


def test_resources(url: str) -> None:
    async def work(c: Client) -> dict[str, Any]:
        uris = {str(r.uri) for r in (await c.list_resources()).resources}
        assert {"mlx-manager://models", "mlx-manager://profiles", "mlx-manager://loaded"} <= uris
        return {u: json.loads((await c.read_resource(u)).contents[0].text) for u in uris}

    data = session(url, work)
    assert "tiny-a" in {m["id"] for m in data["mlx-manager://models"]}
    assert isinstance(data["mlx-manager://profiles"], list)
    assert isinstance(data["mlx-manager://loaded"], list)


def test_dns_rebinding_protection(server: Server) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    r = httpx.post(server.url + "/mcp", json=body, headers={"Host": "evil.example:80"})
    assert r.status_code in (403, 421)
    assert httpx.get(server.url + "/health").status_code == 200


def test_profile_survives_restart(models: Models, tmp_path: Path) -> None:
    env = {"MLX_MANAGER_MODEL_DIRS": str(models.folder), "HF_HUB_CACHE": str(models.hf_cache)}
    first = start_server(tmp_path / "home", env)
    try:
        call(first.url + "/mcp", "create_profile", name="keeper", model="tiny-b", top_p=0.5)
    finally:
        first.stop()
    second = start_server(tmp_path / "home", env)
    try:
        assert call(second.url + "/mcp", "get_profile", name="keeper")["top_p"] == 0.5
        r = openai.OpenAI(base_url=second.v1, api_key="x").chat.completions.create(
            model="keeper", messages=HELLO, max_tokens=2
        )
        assert r.choices[0].finish_reason in ("length", "stop")
    finally:
        second.stop()


def _stdio(models: Models, home: Path, port: int) -> StdioServerParameters:
    env = {
        **os.environ,
        "MLX_MANAGER_HOME": str(home),
        "MLX_MANAGER_PORT": str(port),
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(models.hf_cache),
        "HF_HUB_OFFLINE": "1",
    }
    return StdioServerParameters(
        command=sys.executable, args=["-m", "gateway.cli", "mcp"], env=env, cwd=str(ROOT)
    )


def test_stdio_with_its_own_pool(models: Models, tmp_path: Path) -> None:
    params = _stdio(models, tmp_path / "home", free_port())  # no server on that port

    async def work(c: Client) -> None:
        assert {t.name for t in (await c.list_tools()).tools} == TOOLS
        made = await c.call_tool(
            "create_profile", {"name": "stdio-p", "model": "tiny-a", "temperature": 0}
        )
        assert not made.is_error
        reply = await c.call_tool("chat", {"model": "stdio-p", "messages": HELLO, "max_tokens": 3})
        assert not reply.is_error and reply.structured_content["usage"]["completion_tokens"]
        loaded = (await c.call_tool("list_loaded", {})).structured_content["loaded"]
        assert [r["model"] for r in loaded] == ["tiny-a"]
        bad = await c.call_tool("get_profile", {"name": "nope"})
        assert bad.is_error

    session(params, work)
    # The profile went to the shared database.
    from config.store import Store

    assert Store(tmp_path / "home" / "mlx-manager.db").profile("stdio-p")["temperature"] == 0


def test_stdio_uses_the_running_server(models: Models, tmp_path: Path) -> None:
    env = {"MLX_MANAGER_MODEL_DIRS": str(models.folder), "HF_HUB_CACHE": str(models.hf_cache)}
    server = start_server(tmp_path / "home", env)
    try:
        params = _stdio(models, tmp_path / "home", server.port)

        async def work(c: Client) -> None:
            loaded = await c.call_tool("load_model", {"model": "tiny-d"})
            assert not loaded.is_error, loaded.content[0].text
            reply = await c.call_tool(
                "chat", {"model": "tiny-d", "messages": HELLO, "max_tokens": 2}
            )
            assert 1 <= reply.structured_content["usage"]["completion_tokens"] <= 2
            # Every answer comes from the server that owns the state: its loaded models, its
            # downloads, and the memory factor it measured on the models it loaded.
            status = httpx.get(server.url + "/admin/workers", timeout=10).json()
            loaded = (await c.call_tool("list_loaded", {})).structured_content
            assert [w["model"] for w in loaded["loaded"]] == [w["model"] for w in status["data"]]
            assert loaded["estimate_factor"] == status["memory_estimate_factor"]
            info = (await c.call_tool("model_info", {"model": "tiny-a"})).structured_content
            weights = info["estimated_memory_bytes"] / status["memory_estimate_factor"]
            assert abs(weights - _weights(models.path("tiny-a"))) <= 1
            downloads = (await c.call_tool("list_downloads", {})).structured_content
            served = httpx.get(server.url + "/admin/downloads", timeout=10).json()["data"]
            assert downloads["downloads"] == served

        session(params, work)
        # The server loaded it and served the chat: its workers, not a second pool.
        w = server.worker("tiny-d")
        assert w["state"] == "ready" and w["requests_served"] == 1
        me = [
            p
            for p in psutil.Process(server.proc.pid).children()
            if "gateway.engine.worker" in " ".join(p.cmdline())
        ]
        assert w["pid"] in {p.pid for p in me}
    finally:
        server.stop()


def _weights(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_model_info_hints(url: str, server: Server, models: Models, tmp_path: Path) -> None:
    import shutil

    # Nested in the server's own models folder: not listed, but a path there may be served.
    folder = shutil.copytree(models.path("tiny-a"), server.home / "models" / tmp_path.name / "m")
    template = folder / "chat_template.jinja"
    template.write_text("{% if tools %}{{ tools }}{% endif %}<think>{{ messages }}</think>")
    config = json.loads((folder / "config.json").read_text())
    config |= {"quantization": {"bits": 4, "group_size": 64}, "vision_config": {}}
    (folder / "config.json").write_text(json.dumps(config))
    info = call(url, "model_info", model=str(folder))  # an absolute path is a model name too
    # A template that mentions <think> is not enough: reasoning is split at think markers in
    # the vocabulary (test_model_info_reasoning_is_what_the_worker_does), and tiny-a has none.
    assert (info["tool_calling"], info["reasoning"], info["multimodal"]) == (True, False, True)
    assert info["quantization"] == {"bits": 4, "group_size": 64}
    plain = call(url, "model_info", model="tiny-a")
    assert (plain["tool_calling"], plain["reasoning"], plain["multimodal"]) == (False,) * 3


def test_model_info_reasoning_is_what_the_worker_does(url: str, client: openai.OpenAI) -> None:
    """model_info's `reasoning` and the worker's splitting of reasoning come from one
    function (gateway.hub.think_markers): a model that says it reasons has its thinking in
    reasoning_content, and one that says it does not, never."""
    assert call(url, "model_info", model="tiny-agent")["reasoning"] is True
    think = client.chat.completions.create(
        model="tiny-agent", messages=ASK_THINK, temperature=0, max_tokens=40
    )
    assert think.choices[0].message.model_extra["reasoning_content"] == THOUGHT
    assert call(url, "model_info", model="tiny-a")["reasoning"] is False
    plain = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=4)
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


def test_server_info_descriptions_and_no_prompts(url: str) -> None:
    async def work(c: Client) -> Any:
        tools = (await c.list_tools()).tools
        with pytest.raises(MCPError) as e:
            await c.get_prompt("nope")
        return c.server_info, c.server_capabilities, tools, e.value.error

    info, capabilities, tools, prompt_error = session(url, work)
    assert info.name == "mlx-manager" and info.version == version("mlx-manager")
    for t in tools:  # the docstrings' source indentation is gone
        assert t.description == inspect.cleandoc(t.description), t.name
        assert not any(line[:1].isspace() for line in t.description.splitlines()), t.name
    # No prompts: none advertised, and asking for one is "method not found", not a crash.
    assert capabilities.prompts is None
    assert prompt_error.code == METHOD_NOT_FOUND


def test_clients_leave_no_tracebacks_or_failed_streams(models: Models, tmp_path: Path) -> None:
    """A session over the SDK's streamable HTTP transport that asks for an unknown prompt,
    then goes away without ending its session (as a client that quits does): its GET /mcp
    stream ends with the client, which is normal, so it is logged at debug level, not as a
    499; and the unknown prompt leaves no traceback."""
    home = tmp_path / "home"
    server = start_server(home, models.env(home, log_level="debug"))
    try:

        async def main() -> None:
            transport = streamable_http_client(server.url + "/mcp", terminate_on_close=False)
            async with transport as (read, write, *_), ClientSession(read, write) as s:
                init = await s.initialize()
                assert init.capabilities.prompts is None
                assert init.server_info.version == version("mlx-manager")
                with pytest.raises(MCPError) as e:
                    await s.get_prompt("nope")
                assert e.value.error.code == METHOD_NOT_FOUND

        asyncio.run(main())
        log = home / "logs" / "mlx-manager.log"
        line = server.wait_for(
            lambda: next((x for x in log.read_text().splitlines() if "GET path=/mcp" in x), None),
            what="the GET /mcp stream's log line",
        )
        assert " DEBUG mlx_manager.access: " in line, line
        assert "Traceback" not in log.read_text()
    finally:
        server.stop()
