"""The `mlx-manager` subcommands, run as a user runs them, on the same services as MCP."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai

from gateway.cli.progress import ProgressLine, download_text
from gateway.cli.tables import aligned, table
from gateway.units import format_age, format_duration, format_time
from tests.conftest import Models
from tests.fake_hub import FakeHub, repo_from_folder
from tests.server import ROOT, free_port, start_server

MICROSECONDS = re.compile(r"\d\d:\d\d:\d\d\.\d")  # an ISO time as stored


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, **env},
        timeout=120,
    )


def cli_bytes(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """As `cli`, with the output as written: text mode would turn each \\r into a newline."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, **env},
        timeout=120,
    )


def for_people(text: str) -> None:
    """What no table for people shows: Python's None, raw ISO times, raw byte counts."""
    assert "None" not in text and not MICROSECONDS.search(text) and "_bytes" not in text


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
        loaded = cli_bytes(env, "load", "tiny-a")
        assert loaded.returncode == 0, loaded.stderr
        # Not a terminal: whole lines, no carriage return, the last one ended.
        progress = loaded.stderr.decode()
        assert "\r" not in progress and progress.endswith("\n")
        lines = progress.splitlines()
        assert lines[0] == "loading tiny-a" and lines[-1].startswith("tiny-a is ready (")
        assert loaded.stdout.decode().split()[:2] == ["MODEL", "STATE"]  # ps's row
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


def test_tables_for_people(server: Any, models: Models) -> None:
    """Every listing reads as a person reads it and fits the terminal; --json stays raw."""
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(models.hf_cache),
        "HF_HUB_OFFLINE": "1",
        "MLX_MANAGER_HOME": str(server.home),
        "MLX_MANAGER_PORT": str(server.port),
    }
    narrow = {**env, "COLUMNS": "60"}

    def shown(width: int, *args: str) -> list[str]:
        r = cli({**env, "COLUMNS": str(width)}, *args)
        assert r.returncode == 0, r.stderr
        for_people(r.stdout)
        lines = r.stdout.splitlines()
        assert lines and all(len(line) <= width for line in lines), r.stdout
        return lines

    listed = shown(80, "models")
    assert listed[0].split() == [
        "MODEL",
        "FAMILY",
        "QUANT",
        "CONTEXT",
        "SIZE",
        "LOADED",
        "DESCRIPTION",
    ]
    tiny_a = next(line for line in listed if line.startswith("tiny-a "))
    assert "568.0 KiB" in tiny_a and tiny_a.endswith("…")  # the description, cut to fit
    assert "tiny-org/tiny-hf " in "\n".join(listed)  # the first column is kept whole
    raw = {m["id"]: m for m in as_json(narrow, "models")}
    assert isinstance(raw["tiny-a"]["size_bytes"], int)
    assert raw["tiny-a"]["description"].startswith("random weights")
    details = shown(100, "models", "tiny-a")
    assert "size:" in details[details.index(next(x for x in details if x.startswith("size:")))]
    assert any(x.startswith("parameters:") and x.endswith("K") for x in details)

    made = as_json(
        env, "profiles", "create", "people", "--model", "tiny-b", "--description", "x" * 80
    )
    assert MICROSECONDS.search(made["created"])  # raw, as stored
    profiles = shown(100, "profiles")
    row = next(line for line in profiles if line.startswith("people "))
    assert row.split()[1] == "tiny-b" and " ago " in row and "…" in row
    assert profiles[0].split()[:3] == ["NAME", "MODEL", "ALIASES"]
    assert "DESCRIPTION" not in shown(60, "profiles")[0]  # no room: the last columns go
    shown(60, "models")
    shown(100, "profiles", "show", "people")
    assert as_json(env, "profiles", "delete", "people")["name"] == "people"

    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    hello = [{"role": "user", "content": "hello"}]
    client.chat.completions.create(model="tiny-a", messages=hello, max_tokens=2)  # type: ignore[arg-type]
    logs = shown(200, "logs", "-n", "1")
    assert re.fullmatch(r"\d\d:\d\d:\d\d", logs[1].split()[0])  # today's local time
    assert "T" in as_json(env, "logs", "-n", "1")[0]["time"]  # the raw ISO time
    # A request refused before it named a model is a usage row of its own, shown as such.
    refused = httpx.post(server.v1 + "/chat/completions", json={"messages": hello}, timeout=30)
    assert refused.status_code == 400
    usage = shown(120, "usage")
    assert usage[-1].split()[0] == "(all)" and any(u.split()[0] == "(none)" for u in usage)
    assert as_json(env, "usage")["total"]["requests"] >= 1
    assert shown(100, "ps")[0].split()[:2] == ["MODEL", "STATE"]
    assert shown(40, "ps")[0].split()[:2] == ["MODEL", "STATE"]
    assert cli(env, "downloads").stdout.strip() == "(none)" and as_json(env, "downloads") == []
    assert as_json(env, "unload", "tiny-a")["was_loaded"] is True


def test_pull_and_keys_without_a_server(models: Models, tmp_path: Path) -> None:
    hub = FakeHub().start()
    hub.add(repo_from_folder("mlx-community/tiny-pull", models.path("tiny-a")))
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "MLX_MANAGER_HOME": str(tmp_path / "home"),
        "MLX_MANAGER_PORT": str(free_port()),
    }
    try:
        pulled = cli_bytes(env, "pull", "mlx-community/tiny-pull")
    finally:
        hub.stop()
    assert pulled.returncode == 0, pulled.stderr
    progress = pulled.stderr.decode()
    assert "\r" not in progress and progress.endswith("\n")
    last = progress.splitlines()[-1]
    assert "100%" in last and "KiB of" in last and last.endswith("done")
    assert pulled.stdout.decode() == "Downloaded mlx-community/tiny-pull: 567.9 KiB in 5 files.\n"

    created = as_json(env, "keys", "create", "reader")
    assert created["key"].startswith("mlxm-")
    listed = cli(env, "keys")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split() == [
        "NAME",
        "PREFIX",
        "CREATED",
        "LAST",
        "USED",
    ]
    for_people(listed.stdout)
    assert re.search(r"^reader +mlxm-\S+ +\d+s ago$", listed.stdout, re.M), listed.stdout
    assert MICROSECONDS.search(as_json(env, "keys")[0]["created"])


NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def test_units_for_people() -> None:
    assert [format_duration(s) for s in (0, 59.9, 60, 3599, 3600, 4 * 3600 + 86400)] == [
        "0s",
        "59s",
        "1m00s",
        "59m59s",
        "1h00m",
        "1d4h",
    ]
    ago = {s: format_age((NOW - timedelta(seconds=s)).isoformat(), NOW) for s in (5, 300, 7200)}
    assert ago == {5: "5s ago", 300: "5m ago", 7200: "2h ago"}
    assert format_age("2026-11-27T11:59:59.123456+00:00", NOW) == "3d ago"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", format_age("2025-01-01T00:00:00+00:00", NOW))
    # A time without a zone is UTC (SQLite's), shown in local time.
    moment = NOW.astimezone().strftime("%H:%M:%S")
    assert format_time("2026-11-30T12:00:00", NOW) == moment
    assert format_time("2026-11-30T12:00:00.5+00:00", NOW) == moment


def test_table_cuts_the_widest_columns_to_fit() -> None:
    rows = [{"NAME": "a-long-model-name", "SIZE": "1.5 GiB", "NOTE": "n" * 50}]
    whole = aligned(rows, None)
    assert whole.splitlines()[1].endswith("n" * 50)
    cut = aligned(rows, 40).splitlines()
    assert all(len(line) <= 40 for line in cut)
    assert cut[1].startswith("a-long-model-name  1.5 GiB  n") and cut[1].endswith("n…")
    # Too narrow for every heading: the last columns go, and the name is cut.
    assert aligned(rows, 20).splitlines() == ["NAME         SIZE", "a-long-mod…  1.5 GiB"]
    # Text from a model cannot write terminal escapes, nor break a row in two.
    listed = table([{"name": "x\x1b[2Jy", "note": "one\ntwo", "gone": None}])
    assert listed.splitlines() == ["NAME       NOTE     GONE", "x\\x1b[2Jy  one two"]
    assert table([]) == "(none)"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal_and_off() -> None:
    term = Terminal()
    line = ProgressLine(term)
    line.update("loading a")
    line.update("loading a (0.5s)")
    line.end()
    line.end()  # once only
    line.update("a is ready", final=True)
    assert term.getvalue() == ("\rloading a\x1b[K\rloading a (0.5s)\x1b[K\n\ra is ready\x1b[K\n")
    pipe = io.StringIO()
    line = ProgressLine(pipe)
    for text in ("loading a", "loading a (0.5s)", "loading a (1.0s)"):
        line.update(text)  # within QUIET_SECONDS of the first: left out
    line.update("a is ready", final=True)
    line.end()
    assert pipe.getvalue() == "loading a\na is ready\n"


def test_download_text() -> None:
    job = {
        "model": "org/m",
        "status": "running",
        "bytes_done": 512 * 1024,
        "bytes_total": 2048 * 1024,
        "bytes_per_second": 1024 * 1024,
        "eta_seconds": 1.5,
    }
    assert download_text(job) == (
        "org/m  [#####...............]   25%  512.0 KiB of 2.0 MiB  1.0 MiB/s  ETA 1s"
    )
    queued = {**job, "status": "queued", "bytes_done": 0, "bytes_total": 0}
    assert download_text({**queued, "bytes_per_second": None, "eta_seconds": None}) == (
        "org/m  0 B"
    )
