"""The `mlx-manager` subcommands, run as a user runs them, on the same services as MCP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import Models
from tests.server import ROOT, free_port, start_server


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, **env},
        timeout=120,
    )


def as_json(env: dict[str, str], *args: str) -> Any:
    r = cli(env, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cli_against_a_running_server(models: Models, tmp_path: Path) -> None:
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(models.hf_cache),
        "HF_HUB_OFFLINE": "1",
    }
    server = start_server(tmp_path / "home", env)
    env |= {"MLX_MANAGER_HOME": str(tmp_path / "home"), "MLX_MANAGER_PORT": str(server.port)}
    try:
        r = cli(env, "load", "tiny-a")
        assert r.returncode == 0 and "tiny-a is ready" in r.stderr  # the progress line
        assert server.worker("tiny-a")["state"] == "ready"
        ps = cli(env, "ps")
        assert ps.returncode == 0 and "tiny-a" in ps.stdout and "ready" in ps.stdout
        assert ps.stdout.splitlines()[0].split()[:2] == ["MODEL", "STATE"]
        assert [r["model"] for r in as_json(env, "ps")] == ["tiny-a"]
        listed = {m["id"]: m for m in as_json(env, "models")}
        assert listed["tiny-a"]["loaded"] is True and listed["tiny-b"]["loaded"] is False
        assert as_json(env, "models", "tiny-a")["parameters"] > 0

        made = as_json(
            env,
            "profiles",
            "create",
            "cli-p",
            "--model",
            "tiny-b",
            "--temperature",
            "0.3",
            "--alias",
            "cp",
        )
        assert (made["temperature"], made["aliases"]) == (0.3, ["cp"])
        assert as_json(env, "profiles", "update", "cli-p", "--max-tokens", "7")["max_tokens"] == 7
        assert as_json(env, "profiles", "show", "cli-p")["temperature"] == 0.3
        assert "cli-p" in {p["name"] for p in as_json(env, "profiles")}
        bad = cli(env, "profiles", "create", "cli-q", "--model", "tiny-b", "--top-p", "3")
        assert bad.returncode == 1 and "'top_p'" in bad.stderr and "Traceback" not in bad.stderr

        assert as_json(env, "unload", "tiny-a")["was_loaded"] is True
        assert server.worker("tiny-a") is None
        missing = cli(env, "unload", "no-such-model")
        assert missing.returncode == 1 and "does not exist" in missing.stderr
        assert as_json(env, "profiles", "delete", "cli-p")["name"] == "cli-p"
    finally:
        server.stop()


def test_cli_without_a_server(models: Models, tmp_path: Path) -> None:
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(models.hf_cache),
        "MLX_MANAGER_HOME": str(tmp_path / "home"),
        "MLX_MANAGER_PORT": str(free_port()),
    }
    for command in (("ps",), ("load", "tiny-a")):
        r = cli(env, *command)
        assert r.returncode == 1 and "mlx-manager serve" in r.stderr
    # Models and profiles need no server: they are files and the database.
    assert "tiny-a" in cli(env, "models").stdout
    assert as_json(env, "profiles", "create", "offline", "--model", "tiny-a")["name"] == "offline"
