"""The server's own log file, as a real server writes it: one level and logger prefix per
line in text format, a clean message in JSON format."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Models, Server, start_server

# What logging's default format puts before a message: `INFO:mlx_manager.access:`.
DEFAULT_PREFIX = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:")


def test_text_lines_have_one_prefix(server: Server) -> None:
    httpx.get(server.v1 + "/models", headers={"x-request-id": "t-one-prefix"})
    log = server.home / "logs" / "mlx-manager.log"
    line = server.wait_for(
        lambda: next((x for x in log.read_text().splitlines() if "id=t-one-prefix " in x), None),
        what="the request's log line",
    )
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.match(stamp + r" INFO mlx_manager\.access: request id=t-one-prefix ", line), line
    for x in log.read_text().splitlines():  # every logger's lines, the MCP SDK's included
        assert not DEFAULT_PREFIX.search(x), x


def test_json_messages_are_clean(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = start_server(home, models.env(home, log_format="json"))
    try:
        httpx.get(server.v1 + "/models", headers={"x-request-id": "t-json-line"})
        log = home / "logs" / "mlx-manager.log"

        def entries() -> list[dict[str, Any]]:
            return [json.loads(x) for x in log.read_text().splitlines()]

        entry = server.wait_for(
            lambda: next((e for e in entries() if e.get("id") == "t-json-line"), None),
            what="the request's log entry",
        )
        assert (entry["level"], entry["logger"], entry["message"]) == (
            "info",
            "mlx_manager.access",
            "request",
        )
        for e in entries():
            assert not DEFAULT_PREFIX.match(e["message"]), e
    finally:
        server.stop()
