"""SIGKILL of the server in the middle of profile writes and a download: the database is intact,
every write the server acknowledged is there, nothing half-written is, and a restart carries on
(the download resumes and completes)."""

from __future__ import annotations

import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx

from config.store import Store
from gateway.catalog.profiles import Profile
from tests.conftest import Models
from tests.fake_hub import FakeHub, repo_from_folder
from tests.test_hub import serve

REPO = "mlx-community/tiny-durable"


class Writer(threading.Thread):
    """Creates, updates and deletes its own profiles until the server goes away, recording the
    state each name must have: `acked` after a 2xx, `pending` for the one request whose answer
    never came."""

    def __init__(self, url: str, tag: str) -> None:
        super().__init__(daemon=True)
        self.url, self.tag = url, tag
        self.acked: dict[str, float | None] = {}  # name -> temperature, None: deleted
        self.pending: tuple[str, float | None] | None = None
        self.writes = 0

    def run(self) -> None:
        http = httpx.Client(base_url=self.url, timeout=30)
        i = 0
        try:
            while True:
                name = f"{self.tag}-{i % 7}"
                temp = round((i % 20) / 10, 1)
                if self.acked.get(name) is None:
                    body = {"name": name, "model": "tiny-a", "aliases": [f"{name}-alias"]}
                    self._send(
                        http, name, temp, "POST", "/admin/profiles", body | {"temperature": temp}
                    )
                elif i % 3 == 0:
                    self._send(http, name, None, "DELETE", f"/admin/profiles/{name}")
                else:
                    body = {"temperature": temp, "description": "x" * (i % 50)}
                    self._send(http, name, temp, "PATCH", f"/admin/profiles/{name}", body)
                i += 1
        except httpx.HTTPError:
            return  # the server was killed

    def _send(
        self,
        http: httpx.Client,
        name: str,
        temp: float | None,
        method: str,
        path: str,
        body: Any = None,
    ) -> None:
        self.pending = (name, temp)
        r = http.request(method, path, json=body)
        assert r.status_code < 300, r.text
        self.acked[name] = temp
        self.pending = None
        self.writes += 1


def test_sigkill_during_profile_writes_and_a_download(models: Models, tmp_path: Path) -> None:
    hub = FakeHub().start()
    hub.add(repo_from_folder(REPO, models.path("tiny-big")))
    hub.delay = 0.05
    server = serve(models, hub, tmp_path, MLX_MANAGER_WARM_SPARE="0")
    try:
        job = httpx.post(server.url + "/admin/downloads", json={"model": REPO}).json()
        writers = [Writer(server.url, f"w{n}") for n in range(4)]
        for w in writers:
            w.start()
        blobs = tmp_path / "hf" / ("models--" + REPO.replace("/", "--")) / "blobs"
        server.wait_for(
            lambda: (
                any(p.stat().st_size > 0 for p in blobs.glob("*.incomplete"))
                and sum(w.writes for w in writers) > 100
            ),
            what="a partial download and 100 profile writes",
        )
        server.proc.send_signal(signal.SIGKILL)  # writers are mid-request: some mid-transaction
        server.proc.wait(30)
        for w in writers:
            w.join(30)
        hub.delay = 0

        db_path = tmp_path / "home" / "mlx-manager.db"
        with sqlite3.connect(db_path) as db:
            db.row_factory = sqlite3.Row
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            rows = {r["name"]: dict(r) for r in db.execute("SELECT * FROM profiles")}
            download = dict(
                db.execute("SELECT * FROM downloads WHERE id = ?", [job["id"]]).fetchone()
            )
        # Every acknowledged write is there; the unanswered one is either there or not at all.
        for w in writers:
            for name, temp in w.acked.items():
                expected = [temp]
                if w.pending and w.pending[0] == name:
                    expected.append(w.pending[1])
                actual = rows[name]["temperature"] if name in rows else None
                assert actual in expected, (name, actual, expected)
            if w.pending and w.pending[0] not in w.acked:  # a first create, unanswered
                name = w.pending[0]
                assert name not in rows or rows[name]["temperature"] == w.pending[1]
        # Every row is a whole, valid profile.
        for row in Store(db_path).profiles():
            assert row["created"] and row["updated"] >= row["created"]
            Profile.model_validate(
                {k: v for k, v in row.items() if k not in ("created", "updated")}
            )
        assert (
            download["status"] == "running"
            and 0 <= download["bytes_done"] <= download["bytes_total"]
        )

        # A restart carries on: the same profiles, and the download completes.
        again = serve(models, hub, tmp_path, MLX_MANAGER_WARM_SPARE="0")
        try:
            listed = httpx.get(again.url + "/admin/profiles").json()["data"]
            assert {p["name"] for p in listed} == set(rows)

            def done() -> dict[str, Any] | None:
                jobs = httpx.get(again.url + "/admin/downloads").json()["data"]
                return next((j for j in jobs if j["model"] == REPO and j["status"] == "done"), None)

            again.wait_for(done, timeout=60, what="the download to resume and finish")
            reply = httpx.post(
                again.v1 + "/chat/completions",
                json={
                    "model": REPO,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                },
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
        finally:
            again.stop()
    finally:
        hub.stop()
        if server.proc.poll() is None:
            server.stop()
