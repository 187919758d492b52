"""Start the real server (`python -m gateway.cli serve`) on a free loopback port, and stop it
checking that no worker process outlives it. Shared by the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    home: Path
    log: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def token(self) -> str:
        """The key this server run leaves for local clients (accepted once keys are required)."""
        return (self.home / f"server-{self.port}.token").read_text()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def workers(self) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/admin/workers", headers=self.headers, timeout=10)
        return r.json()["data"]

    def worker(self, model: str) -> dict[str, Any] | None:
        return next((w for w in self.workers() if w["model"] == model), None)

    def wait_for(self, predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
        """Poll until predicate() is truthy; fail with the server log if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return  # a test stopped it already (and checked what it left behind)
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        gone, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            p.kill()
        assert not alive, f"worker processes survived shutdown: {alive}"


def start_server(home: Path, env: dict[str, str], *args: str) -> Server:
    port = free_port()
    log = home.parent / f"{home.name}-server.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_MANAGER_HOME": str(home), **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), *args],
        cwd=ROOT,
        env=full_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = Server(proc, port, home, log, full_env)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(server.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    server.wait_for(healthy, timeout=60, what="server to start")
    return server
