"""What a real server leaves in MLX_MANAGER_HOME: private folders and files (they hold API key
hashes and, with log_content, prompts), and log lines a hostile name cannot write terminal
escape codes into."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Models
from tests.server import Server, start_server

HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def srv(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("files") / "home"
    server = start_server(home, models.env(home, log_content="1"))
    yield server
    server.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_database_and_logs_are_private(srv: Server) -> None:
    r = httpx.post(
        srv.v1 + "/chat/completions",
        json={"model": "tiny-a", "messages": HELLO, "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    httpx.get(srv.url + "/admin/requests", timeout=30)  # the request log row is on disk
    home = srv.home
    folders = [home, home / "logs", home / "logs" / "workers"]
    files = [
        home / "mlx-manager.db",
        home / "mlx-manager.db-wal",
        home / "mlx-manager.db-shm",
        home / "logs" / "mlx-manager.log",
        *(home / "logs" / "workers").glob("*.log"),
    ]
    assert (home / "logs" / "workers" / "tiny-a.log") in files
    assert {str(p): oct(mode(p)) for p in folders} == {str(p): "0o700" for p in folders}
    assert {str(p): oct(mode(p)) for p in files} == {str(p): "0o600" for p in files}


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("\x1b[31mred\x1b[0m", "\\u001b[31mred\\u001b[0m"),  # ANSI colour
        ("bell\x07\x08back", "bell\\u0007\\bback"),
        ("csi\x9b2J", "csi\\u009b2J"),  # the one-byte (C1) form of ESC [
        ("del\x7f", "del\\u007f"),
        ("fake\nline", "fake\\nline"),  # a forged second log line
    ],
)
def test_control_characters_in_log_lines_are_escaped(srv: Server, name: str, escaped: str) -> None:
    r = httpx.post(
        srv.v1 + "/chat/completions", json={"model": name, "messages": HELLO}, timeout=30
    )
    assert r.status_code == 404
    request_id = r.headers["x-request-id"]
    log = srv.home / "logs" / "mlx-manager.log"
    line = srv.wait_for(
        lambda: next((x for x in log.read_bytes().splitlines() if request_id.encode() in x), None),
        what="the request's log line",
    )
    text = line.decode()
    assert f'model="{escaped}"' in text
    controls = [c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F]
    assert not controls, f"raw control characters in the log: {controls!r}"
