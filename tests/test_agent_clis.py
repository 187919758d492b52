"""The real coding agents against a real server: Claude Code (`claude -p`, /v1/messages) and
Codex CLI (`codex exec`, /v1/responses), installed from npm, each run once with its own 40-80 KB
system prompt and tools; and their recorded requests (tests/data) replayed byte for byte, which
needs no node. The model answers every chat with the same words (tests/scripted_model.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.scripted_model import ANSWER, DATA, build_scripted_model
from tests.server import Server, start_server

MODEL = "tiny-scripted"
# Pinned: what the recorded requests in tests/data came from; bump both together.
CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"
CODEX = "@openai/codex@0.171.0"
NPM_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-manager-tests"


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("agent-clis")
    build_scripted_model(root / "models" / MODEL)
    (root / "hf").mkdir()
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(root / "models"),
        "HF_HUB_CACHE": str(root / "hf"),
        "MLX_MANAGER_WARM_SPARE": "0",
    }
    srv = start_server(root / "home", env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def npm_bin() -> Path:
    """The agents' binaries, installed once into a cache folder kept between runs."""
    folder = NPM_CACHE / "agent-clis"
    stamp = folder / "installed.txt"
    wanted = f"{CLAUDE_CODE} {CODEX}"
    if not (stamp.exists() and stamp.read_text() == wanted):
        npm = shutil.which("npm")
        assert npm, "npm is needed to install Claude Code and Codex (apt install nodejs npm)"
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), CLAUDE_CODE]
            + [CODEX],
            check=True,
            capture_output=True,
            timeout=600,
        )
        stamp.write_text(wanted)
    return folder / "node_modules" / ".bin"


def _requests(server: Server, endpoint: str) -> list[dict[str, Any]]:
    r = httpx.get(
        server.url + "/admin/requests",
        params={"endpoint": endpoint, "limit": 10},
        headers=server.headers,
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["data"]


def _sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


def _recorded(name: str) -> dict[str, Any]:
    recorded = json.loads((DATA / name).read_text())
    recorded["body"]["model"] = MODEL
    return recorded


def _answers(argv: list[str], home: Path, env: dict[str, str]) -> None:
    """Run an agent CLI in `home` (its HOME too: no user settings) and check that it exits 0
    having printed the model's answer."""
    done = subprocess.run(
        argv,
        env={"PATH": os.environ["PATH"], "HOME": str(home), **env},
        cwd=home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ANSWER in done.stdout


def test_claude_code_request_replayed(agent_server: Server) -> None:
    """Claude Code 2.1's first request as it sent it (76 KB: 24 tools, system blocks with
    cache_control, a system message inside messages, adaptive thinking, context_management,
    output_config, max_tokens 32000, ?beta=true): streamed in Anthropic's event order."""
    recorded = _recorded("claude_code_request.json")
    headers = {**recorded["headers"], "x-api-key": "unused"}
    with httpx.stream(
        "POST",
        agent_server.url + recorded["path"],
        json=recorded["body"],
        headers=headers,
        timeout=300,
    ) as r:
        assert r.status_code == 200, r.read()
        events = _sse(r)
    kinds = [e["type"] for _, e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(e["delta"]["text"] for _, e in events if e["type"] == "content_block_delta")
    assert text == ANSWER
    delta = next(e for _, e in events if e["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert all(name == e["type"] for name, e in events)


def test_codex_request_replayed(agent_server: Server) -> None:
    """Codex CLI 0.171's first request as it sent it (store false, developer messages, function
    tools beside a namespace and a web_search tool, reasoning, include, prompt_cache_key)."""
    recorded = _recorded("codex_request.json")
    with httpx.stream(
        "POST",
        agent_server.v1 + "/responses",
        json=recorded["body"],
        headers={**recorded["headers"], "authorization": "Bearer unused"},
        timeout=300,
    ) as r:
        assert r.status_code == 200, r.read()
        events = _sse(r)
    kinds = [e["type"] for _, e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    numbers = [e["sequence_number"] for _, e in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    done = events[-1][1]["response"]
    assert done["status"] == "completed"
    message = next(i for i in done["output"] if i["type"] == "message")
    assert message["content"][0]["text"] == ANSWER


def test_claude_code_cli(agent_server: Server, npm_bin: Path, tmp_path: Path) -> None:
    """`claude -p` with ANTHROPIC_BASE_URL, naming the model by a profile alias (a client that
    hard-codes a model name works unchanged)."""
    profile = {"name": "local-coder", "model": MODEL, "aliases": ["claude-sonnet-4-5"]}
    r = httpx.post(agent_server.url + "/admin/profiles", json=profile, headers=agent_server.headers)
    assert r.status_code in (200, 201), r.text
    env = {
        "ANTHROPIC_BASE_URL": agent_server.url,
        "ANTHROPIC_API_KEY": "unused",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    claude = [str(npm_bin / "claude"), "-p", "say hi", "--model", "claude-sonnet-4-5"]
    _answers(claude, tmp_path, env)
    rows = _requests(agent_server, "/v1/messages")
    row = next(r for r in rows if r["profile"] == "local-coder")
    assert row["status"] == 200 and row["model"] == MODEL
    assert row["prompt_tokens"] > 5000  # its system prompt and tools, whole


def test_codex_cli(agent_server: Server, npm_bin: Path, tmp_path: Path) -> None:
    """`codex exec` with a custom provider speaking the Responses API."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\n'
        'model_provider = "mlx"\n\n'
        "[model_providers.mlx]\n"
        'name = "mlx-manager"\n'
        f'base_url = "{agent_server.v1}"\n'
        'wire_api = "responses"\n'
        'env_key = "MLX_MANAGER_API_KEY"\n'
    )
    env = {"CODEX_HOME": str(home), "MLX_MANAGER_API_KEY": "unused"}
    _answers([str(npm_bin / "codex"), "exec", "--skip-git-repo-check", "say hi"], tmp_path, env)
    rows = _requests(agent_server, "/v1/responses")
    assert any(r["status"] == 200 and r["prompt_tokens"] > 3000 for r in rows), rows
