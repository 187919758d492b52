"""The gateway's end of one worker process: spawn it, wait for the model to load, pass requests
down the pipe and route the events that come back to each request's queue. ProcessWorkers is
the pool's default worker factory: it makes these handles and keeps a warm process for them."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from config.settings import Settings
from gateway.catalog.local import LocalModel
from gateway.engine.pipe import LoopPipe
from gateway.engine.protocol import (
    Activity,
    Cancel,
    Embed,
    Embedded,
    Event,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    Load,
    LoadFailed,
    Ready,
    Stop,
    Warm,
)
from gateway.errors import InvalidRequest, ModelUnavailable
from gateway.observe import logs

log = logging.getLogger("mlx_manager.worker")
_rids = itertools.count()
Sink = Callable[[Event], None]


class WorkerProcess:
    """A started worker process that has no model yet: it imports MLX, then waits."""

    def __init__(self) -> None:
        # A fresh interpreter running `-m gateway.engine.worker` (not multiprocessing's spawn, which
        # re-imports the parent's __main__ in the child).
        ours, theirs = socket.socketpair()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.engine.worker", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            # stdout is the protocol channel of `mlx-manager mcp`: a worker writes only to stderr.
            stdout=2,
        )
        theirs.close()  # so the socket reports EOF when the worker exits
        self.pipe = LoopPipe(ours)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def warm(self) -> bool:
        """Its imports are done: its "warm" message waits to be read."""
        return self.alive and self.pipe.readable()

    def discard(self) -> None:
        """Close our end (the worker then exits on its own) and make sure it does."""
        self.pipe.close()
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class WarmSpare:
    """One worker process kept warm (MLX imported, no model): a cold load then costs little
    more than reading the weights. A new one starts after a load ends, not during it, so its
    imports do not compete with that load for the CPU."""

    def __init__(self) -> None:
        self.process: WorkerProcess | None = None
        self.closed = False

    def replenish(self) -> None:
        if not self.closed and (self.process is None or not self.process.alive):
            self.process = WorkerProcess()

    def take(self) -> WorkerProcess | None:
        spare, self.process = self.process, None
        return spare if spare is not None and spare.alive else None

    def status(self) -> dict[str, Any] | None:
        spare = self.process
        return {"pid": spare.popen.pid, "warm": spare.warm} if spare is not None else None

    def close(self) -> None:
        """No new spare, and the one left is killed: it holds no model, and one still importing
        MLX would otherwise run on for seconds after the server has gone."""
        self.closed = True
        spare, self.process = self.process, None
        if spare is not None:
            spare.pipe.close()
            spare.popen.kill()
            spare.popen.wait()


class ProcessWorkers:
    """The pool's default worker factory: each model in its own worker process, started from
    the warm spare when there is one (settings.warm_spare)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spare = WarmSpare() if settings.warm_spare else None

    def start(self) -> None:
        if self.spare is not None:
            self.spare.replenish()

    def close(self) -> None:
        """No spare once the server shuts down."""
        if self.spare is not None:
            self.spare.close()

    def __call__(
        self,
        model: LocalModel,
        options: dict[str, Any],
        on_exit: Callable[[WorkerHandle], None],
    ) -> WorkerHandle:
        stall_timeout = self.settings.worker_stall_timeout
        return WorkerHandle(model, options, on_exit, stall_timeout, self.spare)


class WorkerHandle:
    def __init__(
        self,
        model: LocalModel,
        options: dict[str, Any],
        on_exit: Callable[[WorkerHandle], None] | None = None,
        stall_timeout: float = 0.0,
        spare: WarmSpare | None = None,
    ) -> None:
        self.model = model
        self.spare = spare  # where start() takes its process from, and refills after
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
        # A worker that sends nothing (not even its heartbeat) for this long is hung: stopped,
        # deadlocked or swapped out. 0: never judged so.
        self.stall_timeout = stall_timeout
        self.stalled = False
        self.heard = time.monotonic()  # when the worker last sent anything
        self._sinks: dict[str, Sink] = {}
        self._ready: asyncio.Future[None] | None = None
        self._pipe: LoopPipe | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._ps: psutil.Process | None = None
        self._cpu_mark: float | None = None  # the silent worker's CPU time at the last look

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def in_flight(self) -> int:
        return len(self._sinks)

    @property
    def silent_seconds(self) -> float:
        return time.monotonic() - self.heard

    async def start(self, timeout: float, process: WorkerProcess | None = None) -> None:
        """Load the model in `process`, else the warm spare, else a new process, and wait until
        it is ready (ModelUnavailable if it fails)."""
        if process is None and self.spare is not None:
            process = self.spare.take()
        try:
            await self._start(timeout, process)
        finally:
            if self.spare is not None:
                self.spare.replenish()

    async def _start(self, timeout: float, process: WorkerProcess | None) -> None:
        process = process if process is not None and process.alive else WorkerProcess()
        self._proc, self._pipe = process.popen, process.pipe
        if self.log_file is not None:
            logs.rotate(self.log_file)
            self._log(f"starting worker pid {self.pid} for {self.model.path}")
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self.heard = time.monotonic()
        self._pipe.attach(self._loop, self._dispatch_all, self._on_eof)
        self._pipe.send(Load(str(self.model.path), self.options))
        self._watch()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self._fail(f"loading took longer than {timeout:.0f}s")
            raise ModelUnavailable(
                f"Model '{self.model.id}' did not finish loading within {timeout:.0f}s."
            ) from None

    def submit(self, req: dict[str, Any], sink: Sink) -> str:
        """Start generating one choice; its events go to `sink`."""
        return self._send(Generate, req, sink)

    def embed(self, req: dict[str, Any], sink: Sink) -> str:
        """Ask for embeddings; the one Embedded (or Failed) goes to `sink`."""
        return self._send(Embed, req, sink)

    def _send(self, message: type[Generate] | type[Embed], req: dict[str, Any], sink: Sink) -> str:
        if self.state != "ready" or self._pipe is None:
            raise ModelUnavailable(f"Model '{self.model.id}' is not loaded (state {self.state}).")
        rid = f"r{next(_rids)}"
        try:
            self._pipe.send(message(rid, req))
        except OSError:
            raise ModelUnavailable(
                f"Model '{self.model.id}' is unavailable: its worker has gone. Retry the request."
            ) from None
        except Exception as e:  # nothing was queued: the pipe and the worker are unharmed
            raise InvalidRequest(
                f"The request could not be passed to the model's worker: {type(e).__name__}."
            ) from None
        self._sinks[rid] = sink
        return rid

    def cancel(self, rid: str) -> None:
        """Stop generating for a request whose client went away."""
        if self._sinks.pop(rid, None) is not None and self.state == "ready" and self._pipe:
            try:
                self._pipe.send(Cancel(rid))
            except OSError:
                pass

    # Events from the worker -----------------------------------------------------------------

    def _dispatch_all(self, messages: list[Any]) -> None:
        self.heard = time.monotonic()
        for msg in messages:
            self._dispatch(msg)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, list):  # one decode step's events
            sinks = self._sinks
            for ev in msg:
                if isinstance(ev, Activity):
                    self._measure_rate(ev.active, ev.generated)
                    self.worker_active, self.generated_tokens = ev.active, ev.generated
                    self.info["memory_bytes"] = ev.memory_bytes
                    continue
                sink = sinks.get(ev.seq)
                if sink is None:
                    continue  # a cancelled request's last tokens
                if isinstance(ev, Finished | Failed | Embedded):
                    del sinks[ev.seq]
                sink(ev)
        elif isinstance(msg, Heartbeat | Warm):
            pass  # alive; imports done (the load message is on its way)
        elif isinstance(msg, Ready):
            self.info = msg.info
            self.state = "ready"
            log.info(
                "loaded %s in %.2fs (pid %s)", self.model.id, msg.info["load_seconds"], self.pid
            )
            if self._ready and not self._ready.done():
                self._ready.set_result(None)
        elif isinstance(msg, LoadFailed):
            where = f" (traceback in {self.log_file})" if self.log_file else f"\n{msg.traceback}"
            log.error("worker for %s failed to load: %s%s", self.model.id, msg.error, where)
            self._fail(f"failed to load: {msg.error}")

    def _on_eof(self) -> None:
        """The worker closed its end: it exited (or is exiting). Its exit status names the
        cause; reaping it is left to a thread so the loop never waits on a process."""
        if self.state not in ("loading", "ready"):
            return
        proc = self._proc

        async def reap() -> None:
            code = None
            if proc is not None:
                try:
                    code = await asyncio.to_thread(proc.wait, 1)
                except subprocess.TimeoutExpired:
                    pass
            self._fail(f"the worker process exited unexpectedly ({logs.exit_description(code)})")

        assert self._loop is not None
        self._loop.create_task(reap())

    # Hung workers ---------------------------------------------------------------------------

    def _watch(self) -> None:
        """Check every quarter of the stall timeout that the worker still speaks. Its
        heartbeat thread beats through MLX's computations (MLX releases the GIL), so silence
        means the process cannot run (stopped, deadlocked) or holds the GIL in native code (a
        tokenizer on a huge prompt): the second uses CPU time and is left alone; the first is
        killed and its requests fail with 503."""
        self._watchdog = None
        if self.stall_timeout <= 0 or self.state not in ("loading", "ready") or not self._loop:
            return
        if self._pipe is not None:
            self._pipe.read_ready()  # what arrived while the loop itself was busy counts
        silent = self.silent_seconds
        if silent <= self.stall_timeout:
            self._cpu_mark = None
        else:
            hung = self._hung()
            if hung:
                self.stalled = True
                self._fail(
                    f"the worker stopped answering ({hung}, no heartbeat for {silent:.0f}s; "
                    f"MLX_MANAGER_WORKER_STALL_TIMEOUT={self.stall_timeout:g}s); it was killed"
                )
                return
        self._watchdog = self._loop.call_later(max(0.05, self.stall_timeout / 4), self._watch)

    def _hung(self) -> str | None:
        """Why a silent worker is hung, or None while it still computes."""
        try:
            if self._ps is None:
                assert self.pid is not None
                self._ps = psutil.Process(self.pid)
            status = self._ps.status()
            if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                return "its process is stopped"
            if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return "its process has exited"
            times = self._ps.cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            return "its process has gone"
        previous, self._cpu_mark = self._cpu_mark, cpu
        if previous is not None and cpu <= previous:
            return "it uses no CPU"
        return None  # busy, or the first look: judge at the next one

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
        self._stop_watching()
        log.warning("worker for %s: %s", self.model.id, reason)
        self._log(f"worker pid {self.pid} failed: {reason}")
        self.state, self.error = "failed", reason
        message = f"Model '{self.model.id}' is unavailable: {reason}. Retry the request."
        if self._ready and not self._ready.done():
            self._ready.set_exception(ModelUnavailable(message))
            self._ready.exception()  # mark retrieved: start() may have timed out already
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            sink(Failed(rid, "ModelUnavailable", message))
        self._close_pipe()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
            if self._loop is not None:
                self._loop.run_in_executor(None, proc.wait)  # reap it off the loop
        if self.on_exit is not None:
            self.on_exit(self)

    def _stop_watching(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    async def stop(self, reason: str = "it was unloaded", timeout: float = 5.0) -> None:
        """Ask the worker to exit, wait for it, and kill it if it does not. Requests still
        running on it fail with `reason`."""
        if self.state == "stopped":
            return
        was_failed = self.state == "failed"
        self._stop_watching()
        if not was_failed:
            self._log(f"stopping worker pid {self.pid}: {reason}")
        self.state = "stopped"
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            sink(
                Failed(
                    rid,
                    "ModelUnavailable",
                    f"Model '{self.model.id}' stopped before finishing: {reason}.",
                )
            )
        if self._pipe is not None and not was_failed:
            try:
                self._pipe.send(Stop())
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
