"""A real server whose MLX_MANAGER_HOME fills up (a 2 MB tmpfs): writes are refused with a clear
"disk full" error naming the folder, requests keep being answered, and what the request log and
the log file could not keep is counted and reported once space returns."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import httpx

from tests.conftest import Models
from tests.server import Server, start_server
from tests.test_mcp import error
from tests.test_observability import scrape, value

HELLO = [{"role": "user", "content": "hello world"}]
ROWS_DROPPED = "mlx_manager_request_log_rows_dropped_total"
LINES_DROPPED = "mlx_manager_log_lines_dropped_total"


def fill(folder: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def chat(srv: Server) -> None:
    r = httpx.post(
        srv.v1 + "/chat/completions",
        json={"model": "tiny-a", "messages": HELLO, "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text


def test_a_full_disk_is_reported_and_what_was_dropped_is_counted(
    models: Models, small_disk: Path
) -> None:
    srv = start_server(small_disk, models.env(small_disk))
    try:
        chat(srv)  # loaded while there is room (its worker log is on the small disk too)
        httpx.get(srv.url + "/admin/requests", timeout=30)  # and its row written
        filler = fill(small_disk)

        profile = {"name": "full", "model": "tiny-a"}
        r = httpx.post(srv.url + "/admin/profiles", json=profile, timeout=30)
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "disk_full" and str(small_disk) in err["message"]
        message = error(srv.url + "/mcp", "create_profile", name="full-mcp", model="tiny-a")
        assert "disk is full" in message and str(small_disk) in message

        for _ in range(3):
            chat(srv)  # answered: only their request log rows and log lines are lost
        srv.wait_for(lambda: value(scrape(srv), ROWS_DROPPED) == 3, what="3 rows dropped")
        # More log lines than the log file's last, partly used page can take (tmpfs pages are
        # 4 KiB; each of these lines is over 300 bytes).
        for _ in range(40):
            assert httpx.get(srv.url + "/nothing/" + "x" * 300, timeout=30).status_code == 404
        srv.wait_for(lambda: value(scrape(srv), LINES_DROPPED) > 0, what="log lines dropped")

        filler.unlink()
        chat(srv)  # its row is written, and the writer says what it could not write
        log = small_disk / "logs" / "mlx-manager.log"
        srv.wait_for(
            lambda: "3 request log rows were dropped while the disk was full" in log.read_text(),
            what="the dropped rows to be reported",
        )
        found = re.search(r"(\d+) log lines were dropped while the disk was full", log.read_text())
        assert found, log.read_text()[-2000:]
        assert int(found.group(1)) == value(scrape(srv), LINES_DROPPED)

        r = httpx.get(srv.url + "/admin/profiles", timeout=30)
        assert r.status_code == 200 and r.json()["data"] == []  # nothing half-saved
        r = httpx.post(srv.url + "/admin/profiles", json=profile, timeout=30)
        assert r.status_code == 201, r.text
    finally:
        srv.stop()
