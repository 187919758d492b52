"""The gateway's end of one worker process: spawn it, wait for the model to load, pass requests
down the pipe and route the events that come back to each request's queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.errors import ModelUnavailable
from gateway.hub import LocalModel

log = logging.getLogger("mlx_manager.worker")
_rids = itertools.count()
Sink = Callable[[tuple[Any, ...]], None]


class WorkerProcess:
    """A started worker process that has no model yet: it imports MLX, then waits."""

    def __init__(self) -> None:
        # A fresh interpreter running `-m gateway.worker` (not multiprocessing's spawn, which
        # re-imports the parent's __main__ in the child).
        ours, theirs = socket.socketpair()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.worker", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            # stdout is the protocol channel of `mlx-manager mcp`: a worker writes only to stderr.
            stdout=2,
        )
        theirs.close()  # so the socket reports EOF when the worker exits
        self.conn = Connection(ours.detach())

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def warm(self) -> bool:
        """Its imports are done: its "warm" message waits to be read."""
        return self.alive and self.conn.poll()

    def discard(self) -> None:
        """Close our end (the worker then exits on its own) and make sure it does."""
        self.conn.close()
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class WorkerHandle:
    def __init__(
        self,
        model: LocalModel,
        options: dict[str, Any],
        on_exit: Callable[[WorkerHandle], None] | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.on_exit = on_exit  # told once when the worker dies or fails, not when stopped
        self.state = "loading"  # loading -> ready -> stopped | failed
        self.info: dict[str, Any] = {}
        self.worker_active = 0  # sequences the worker itself reports running
        self.generated_tokens = 0
        self.tokens_per_second = 0.0  # decode throughput over the last second or so
        self._rate_mark: tuple[float, int] | None = None  # (when, generated_tokens) to measure from
        self.log_file = Path(options["log_file"]) if options.get("log_file") else None
        self.error: str | None = None
        self._sinks: dict[str, Sink] = {}
        self._ready: asyncio.Future[None] | None = None
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def in_flight(self) -> int:
        return len(self._sinks)

    async def start(self, timeout: float, process: WorkerProcess | None = None) -> None:
        """Load the model in `process` (a warm one) or a new one, and wait until it is ready
        (ModelUnavailable if it fails)."""
        process = process if process is not None and process.alive else WorkerProcess()
        self._proc, self._conn = process.popen, process.conn
        if self.log_file is not None:
            logs.rotate(self.log_file)
            self._log(f"starting worker pid {self.pid} for {self.model.path}")
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._conn.send(("load", str(self.model.path), self.options))
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self._fail(f"loading took longer than {timeout:.0f}s")
            raise ModelUnavailable(
                f"Model '{self.model.id}' did not finish loading within {timeout:.0f}s."
            ) from None

    def submit(self, req: dict[str, Any], sink: Sink) -> str:
        if self.state != "ready" or self._conn is None:
            raise ModelUnavailable(f"Model '{self.model.id}' is not loaded (state {self.state}).")
        rid = f"r{next(_rids)}"
        self._sinks[rid] = sink
        self._conn.send(("gen", rid, req))
        return rid

    def cancel(self, rid: str) -> None:
        """Stop generating for a request whose client went away."""
        if self._sinks.pop(rid, None) is not None and self.state == "ready" and self._conn:
            try:
                self._conn.send(("cancel", rid))
            except OSError:
                pass

    # Events from the worker -----------------------------------------------------------------

    def _on_readable(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while conn.poll():
                self._dispatch(conn.recv())
        except (EOFError, OSError):
            self._on_exit()

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, list):  # one decode step's events
            sinks = self._sinks
            for ev in msg:
                tag = ev[0]
                if tag == "a":
                    self._measure_rate(ev[1], ev[2])
                    self.worker_active, self.generated_tokens = ev[1], ev[2]
                    self.info["memory_bytes"] = ev[3]
                    continue
                sink = sinks.get(ev[1])
                if sink is None:
                    continue  # a cancelled request's last tokens
                if tag in ("f", "e"):
                    del sinks[ev[1]]
                sink(ev)
        elif msg[0] == "warm":
            pass  # imports done; the load message is already on its way
        elif msg[0] == "ready":
            self.info = msg[1]
            self.state = "ready"
            log.info("loaded %s in %.2fs (pid %s)", self.model.id, msg[1]["load_seconds"], self.pid)
            if self._ready and not self._ready.done():
                self._ready.set_result(None)
        elif msg[0] == "load_error":
            where = f" (traceback in {self.log_file})" if self.log_file else f"\n{msg[2]}"
            log.error("worker for %s failed to load: %s%s", self.model.id, msg[1], where)
            self._fail(f"failed to load: {msg[1]}")

    def _on_exit(self) -> None:
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if self.state in ("loading", "ready"):
            self._fail(f"the worker process exited unexpectedly ({logs.exit_description(code)})")
        else:
            self._close_pipe()

    def _measure_rate(self, active: int, generated: int) -> None:
        """Tokens per second from the worker's reports (at least twice a second while it
        generates), measured over windows of a second or more; 0 while it is idle."""
        now = time.monotonic()
        if not active:
            self.tokens_per_second, self._rate_mark = 0.0, None
            return
        mark = self._rate_mark
        if mark is None or not self.worker_active:
            self._rate_mark = (now, generated)
        elif now - mark[0] >= 1.0:
            self.tokens_per_second = (generated - mark[1]) / (now - mark[0])
            self._rate_mark = (now, generated)

    def _log(self, message: str) -> None:
        """A line in the model's worker log: what only the gateway sees."""
        if self.log_file is not None:
            logs.append(self.log_file, message)

    def _fail(self, reason: str) -> None:
        """The worker is gone or unusable: fail everything waiting on it, exactly once."""
        if self.state in ("failed", "stopped"):
            return
        log.warning("worker for %s: %s", self.model.id, reason)
        self._log(f"worker pid {self.pid} failed: {reason}")
        self.state, self.error = "failed", reason
        message = f"Model '{self.model.id}' is unavailable: {reason}. Retry the request."
        if self._ready and not self._ready.done():
            self._ready.set_exception(ModelUnavailable(message))
            self._ready.exception()  # mark retrieved: start() may have timed out already
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            sink(("e", rid, "ModelUnavailable", message))
        self._close_pipe()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self.on_exit is not None:
            self.on_exit(self)

    def _close_pipe(self) -> None:
        if self._conn is not None and self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None

    async def stop(self, reason: str = "it was unloaded", timeout: float = 5.0) -> None:
        """Ask the worker to exit, wait for it, and kill it if it does not. Requests still
        running on it fail with `reason`."""
        if self.state == "stopped":
            return
        was_failed = self.state == "failed"
        if not was_failed:
            self._log(f"stopping worker pid {self.pid}: {reason}")
        self.state = "stopped"
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            sink(
                (
                    "e",
                    rid,
                    "ModelUnavailable",
                    f"Model '{self.model.id}' stopped before finishing: {reason}.",
                )
            )
        if self._conn is not None and not was_failed:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
        proc = self._proc
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, timeout)
        self._close_pipe()
