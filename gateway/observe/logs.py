"""Log files under MLX_MANAGER_HOME/logs: the server's own log (one line per request, as
key=value fields or JSON), and one log per model's worker (its load, its errors, the traceback
of a crash), each rotated.

A worker writes its log itself: it points its stdout and stderr at the file when it is given a
model, so that everything it prints lands there, C-level faults included. The gateway adds what
only it can see (the process died, and how) to the same file.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import os
import queue
import re
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

from config.files import open_append, private_dir
from config.settings import Settings

SERVER_LOG_BYTES = 10_000_000
WORKER_LOG_BYTES = 2_000_000
BACKUPS = 3
ACCESS = "mlx_manager.access"  # the logger of per-request lines


# The server's log ------------------------------------------------------------------------------


# Control characters (C0, DEL, C1) in a value a client chose (a model name) would reach the
# file and the terminal raw: ESC [ sequences recolour or rewrite the screen, a newline forges a
# log line. They are written as JSON escapes instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NEEDS_QUOTES = re.compile(r'[\s"=\x00-\x1f\x7f-\x9f]')
_SHORT = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _escape_char(match: re.Match[str]) -> str:
    c = match.group()
    return _SHORT.get(c) or f"\\u{ord(c):04x}"


def escape_controls(text: str) -> str:
    return _CONTROL.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...`: readable, and still parseable by field.
    One record is one line: control characters in the message are escaped (a traceback keeps
    its line breaks, and loses only the others)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())
        return line

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(escape_controls(x) for x in super().formatException(ei).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        # json.dumps escapes C0 controls; DEL and C1 it leaves raw.
        return escape_controls(json.dumps(entry, ensure_ascii=False, default=str))


def _logfmt(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return escape_controls(json.dumps(text, ensure_ascii=False))
    return text


_dropped_lines = 0  # server log lines a full disk refused, since the start


def dropped_lines() -> int:
    """For /metrics (mlx_manager_log_lines_dropped_total)."""
    return _dropped_lines


class LogFile(logging.handlers.RotatingFileHandler):
    """The server's log file, created 0600 and rotated. Each line is one unbuffered write: a
    line a full disk has no room for is dropped whole and counted (a buffered file would keep
    it, fail every later flush and print a traceback per line to the terminal), and the first
    line written once space returns says how many were lost."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, maxBytes=SERVER_LOG_BYTES, backupCount=BACKUPS, delay=True)
        self.dropped = 0  # since the last line written
        self._torn = False  # a line was cut off: the next one starts on a line of its own

    def _open(self) -> BinaryIO:  # type: ignore[override]
        return open(open_append(Path(self.baseFilename)), "ab", buffering=0)

    def emit(self, record: logging.LogRecord) -> None:
        global _dropped_lines
        try:
            line = self.format(record) + "\n"
            if self.shouldRollover(record):
                self.doRollover()
            if self.dropped:
                self._write(self.format(self._dropped_note()) + "\n")
                self.dropped = 0
            self._write(line)
        except OSError:
            if not self.dropped:
                sys.stderr.write(
                    f"mlx-manager: cannot write {self.baseFilename} (disk full?); "
                    "log lines are dropped and counted until it can\n"
                )
            self.dropped += 1
            _dropped_lines += 1
        except Exception:
            self.handleError(record)

    def _write(self, text: str) -> None:
        if self.stream is None:
            self.stream = self._open()  # type: ignore[assignment]  # binary: see _open
        stream: BinaryIO = self.stream  # type: ignore[assignment]
        data = memoryview((("\n" if self._torn else "") + text).encode(errors="replace"))
        while data:
            data = data[stream.write(data) :]
            self._torn = bool(data)  # part of a line is in: the next write may fail

    def _dropped_note(self) -> logging.LogRecord:
        return logging.makeLogRecord(
            {
                "name": "mlx_manager",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d log lines were dropped while the disk was full",
                "args": (self.dropped,),
            }
        )


def setup_logging(settings: Settings) -> logging.handlers.QueueListener:
    """Log to the terminal and to MLX_MANAGER_HOME/logs/mlx-manager.log (rotated).

    A request only puts its line on a queue; a thread formats and writes it (a formatted,
    flushed write to two files costs ~120 µs, which the request would otherwise wait for).
    Returns the listener, to stop (and drain) at exit."""
    private_dir(settings.logs_dir)
    formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    handlers: list[logging.Handler] = [
        logging.StreamHandler(),
        LogFile(settings.logs_dir / "mlx-manager.log"),
    ]
    for h in handlers:
        h.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    listener.start()
    logging.basicConfig(level=settings.log_level.upper(), handlers=[_Enqueue(records)], force=True)
    return listener


class _Enqueue(logging.handlers.QueueHandler):
    """Queues a record with its message fixed now (its arguments may change later) and its
    traceback kept for the formatter. The default prepare() formats the record with logging's
    basic format, which doubled each line's prefix ("INFO mlx_manager: INFO:mlx_manager: ...")
    and folded tracebacks into the message; the queue never leaves this process, so the
    record needs no flattening."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        return record


# Worker logs ------------------------------------------------------------------------------------


def worker_log_path(logs_dir: Path, model_id: str) -> Path:
    """logs/workers/<model>.log, `org/name` spelled `org--name` as in the HF cache."""
    name = model_id.strip("/").replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-150:] or "model"
    return logs_dir / "workers" / f"{name}.log"


def rotate(path: Path, max_bytes: int = WORKER_LOG_BYTES, backups: int = BACKUPS) -> bool:
    """path -> path.1 -> ... -> path.N when path is over max_bytes; True if it rotated. A log
    that cannot be rotated (permissions, a full disk) keeps growing rather than fail a load."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
        for i in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{i + 1}"))
        path.replace(path.with_name(f"{path.name}.1"))
    except OSError:
        return False
    return True


def stamp(message: str, source: str) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {source}: {message}\n"


def append(path: Path, message: str) -> None:
    """Add one line from the gateway to a worker's log (the worker may be writing too: small
    O_APPEND writes do not interleave)."""
    try:
        fd = open_append(path)
        try:
            os.write(fd, stamp(message, "gateway").encode(errors="replace"))
        finally:
            os.close(fd)
    except OSError:
        logging.getLogger("mlx_manager").warning("could not write %s", path, exc_info=True)


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a log, reaching into its rotated files when it is short."""
    out: deque[str] = deque(maxlen=lines)
    files = [path.with_name(f"{path.name}.{i}") for i in range(BACKUPS, 0, -1)] + [path]
    for f in files:
        try:
            with f.open(errors="replace") as fh:
                out.extend(line.rstrip("\n") for line in fh)
        except FileNotFoundError:
            continue
    return list(out)


def exit_description(code: int | None) -> str:
    """`exit code 1`, `killed by SIGKILL`: how a process ended, as a person says it."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerLogHandler(logging.Handler):
    """Inside a worker: log records go to its stderr, which is its log file; when the file
    grows past its limit, rotate it and point stdout and stderr at a fresh one."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__()
        self.path, self.max_bytes = path, max_bytes
        self.setFormatter(logging.Formatter("%(asctime)s worker: %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if os.fstat(2).st_size > self.max_bytes and rotate(self.path, self.max_bytes):
                redirect_output(self.path)
            os.write(2, (self.format(record) + "\n").encode(errors="replace"))
        except Exception:
            self.handleError(record)


def redirect_output(path: Path) -> None:
    """Point this process's stdout and stderr (the file descriptors, so C code's output goes
    there too) at `path`, appending."""
    fd = open_append(path)  # 0600, as every log under MLX_MANAGER_HOME
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
