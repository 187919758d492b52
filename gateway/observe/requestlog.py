"""The request log: one RequestRecord per generation request, from the moment it arrives to its
last byte, written to the database in the background.

A record is filled in by whoever knows each fact: the HTTP middleware (request id, key, status,
duration), the /v1 handler (model, profile, tokens, time to first token), the error handlers
(the error). Rows are written by a thread in small batches, so a request never waits for the
disk, and pruned to MLX_MANAGER_LOG_RETENTION.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from config.settings import Settings
from config.store import DatabaseFull, Store, timestamp
from gateway.observe.usage import Usage

log = logging.getLogger("mlx_manager")

# Requests that generate: these are logged to the database and counted in the metrics.
GENERATION_ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "mcp:chat",
    }
)
CANCELLED = 499  # the client went away before the answer ended (nginx's convention)
FLUSH_SECONDS = 0.25
MAX_PENDING = 10_000  # rows waiting for the disk; beyond, the oldest are dropped (and said so)


# Row fields that the server's log line carries too, after its id, path, status and model.
LOGGED = (
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "ttft_ms",
    "duration_ms",
    "error",
)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex[:24]


@dataclass(eq=False)
class RequestRecord:
    """What one request asked for and how it went; `endpoint` is its path, or `mcp:chat`."""

    endpoint: str
    method: str = "POST"
    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    key_name: str | None = None
    model: str | None = None  # the name the request gave
    model_id: str | None = None  # the model that name resolved to
    profile: str | None = None
    status: int | None = None  # set when it differs from the HTTP status (a failed stream)
    error: str | None = None
    stream: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    first_token: float | None = None  # perf_counter of the first generated token
    duration: float | None = None  # seconds, set when the response ended
    prompt: str | None = None  # only with log_content
    completion: str | None = None

    def resolved(self, model_id: str, profile: str | None) -> None:
        """The model the request's name resolved to, and the profile it went through."""
        self.model_id, self.profile = model_id, profile

    def generated(self, usage: Usage) -> None:
        """Take the token counts and timing of a generation (finished or cut off)."""
        self.prompt_tokens, self.cached_tokens = usage.prompt_tokens, usage.cached_tokens
        self.completion_tokens = usage.completion_tokens
        self.first_token = usage.first_token
        self.finish_reason = ",".join(usage.finish_reasons) or None

    def failed(self, status: int, message: str) -> None:
        self.status, self.error = status, message

    def end(self, http_status: int | None, complete: bool) -> None:
        """The response is over: `complete` when its last byte was sent."""
        self.duration = time.perf_counter() - self.t0
        if self.status is None:
            self.status = http_status if complete and http_status else CANCELLED
        if self.status == CANCELLED and self.error is None:
            self.error = "the client disconnected before the answer ended"

    @property
    def ttft(self) -> float | None:
        return self.first_token - self.t0 if self.first_token is not None else None

    @property
    def decode_rate(self) -> float | None:
        """Tokens per second after the first one."""
        tokens, ttft = self.completion_tokens, self.ttft
        if not tokens or tokens < 2 or ttft is None or self.duration is None:
            return None
        seconds = self.duration - ttft
        return (tokens - 1) / seconds if seconds > 0 else None

    @property
    def label_model(self) -> str:
        """The model as a metrics label: only resolved models (a typo must not add series)."""
        return self.model_id or ""

    def row(self) -> dict[str, Any]:
        ttft = self.ttft
        return {
            "request_id": self.request_id,
            "time": timestamp(self.started),
            "endpoint": self.endpoint,
            "model": self.model_id or self.model,
            "profile": self.profile,
            "key_name": self.key_name,
            "status": self.status,
            "error": self.error,
            "stream": int(self.stream),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
            "duration_ms": round(self.duration * 1000, 2) if self.duration is not None else None,
            "prompt": self.prompt,
            "completion": self.completion,
        }

    def fields(self, row: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the server's log line for this request says (never its content), the id
        first; fields with no value are left out. `row`: this record's row(), if made."""
        row = row or self.row()
        fields = {
            "id": row["request_id"],
            "method": self.method,
            "path": self.endpoint,
            "status": self.status,
            "model": row["model"],
            "profile": self.profile,
            "key": self.key_name,
            "stream": self.stream or None,
            **{k: row[k] for k in LOGGED},
        }
        return {k: v for k, v in fields.items() if v is not None}


def content_of(value: Any) -> str:
    """Prompt or completion text as stored: text as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class RequestLog:
    """Writes finished records to the database from a thread, and prunes it to the retention."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.max_age, self.max_rows = settings.request_log_limits
        self.enabled = self.max_rows != 0
        self.content = settings.log_content
        self._pending: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        # Rows handed in, and rows written or dropped: flush() waits for the one to catch up.
        self._added = 0
        self._done = 0
        self._dropped = 0
        self.dropped_total = 0  # rows never written, for /metrics
        self._dropped_while_full = 0  # rows a full disk refused, reported when space returns
        self._progress = threading.Condition()

    def add(self, row: dict[str, Any]) -> None:
        """Queue a finished record's row() for the database."""
        if not self.enabled:
            return
        if not self.content and (row["prompt"] is not None or row["completion"] is not None):
            row = {**row, "prompt": None, "completion": None}  # never stored unless asked
        with self._progress:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self._dropped += 1
                self.dropped_total += 1
                self._done += 1
            self._pending.append(row)
            self._added += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="mlx-manager-request-log", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self._write()
            if self._stop:
                return

    def _write(self) -> None:
        with self._progress:
            rows = list(self._pending)
            self._pending.clear()
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("request log: %d rows dropped (the database fell behind)", dropped)
        if not rows:
            return
        try:  # the rows and the pruning they call for, in one transaction
            with self.store.write():
                self.store.add_requests(rows)
                self.store.prune_requests(*self._bounds())
        except DatabaseFull as e:
            # Retrying would fail alike while holding every row (prompts too, with
            # log_content) in memory for as long as the disk stays full: drop and count them.
            if not self._dropped_while_full:
                log.warning(
                    "request log: the disk under %s is full; rows are dropped (and counted in "
                    "/metrics) until there is space",
                    e.folder,
                )
            self._dropped_while_full += len(rows)
            self._finished(len(rows), dropped=len(rows))
            return
        except Exception:  # a busy disk must never fail the requests themselves
            log.warning("could not write %d request log rows", len(rows), exc_info=True)
            with self._progress:
                self._pending.extendleft(reversed(rows))
            time.sleep(1)
            return
        if self._dropped_while_full:
            log.warning(
                "%d request log rows were dropped while the disk was full",
                self._dropped_while_full,
            )
            self._dropped_while_full = 0
        self._finished(len(rows))

    def _finished(self, rows: int, dropped: int = 0) -> None:
        with self._progress:
            self._done += rows
            self.dropped_total += dropped
            self._progress.notify_all()

    def _bounds(self) -> tuple[str | None, int | None]:
        """(the oldest time kept, the most rows kept) for Store.prune_requests."""
        return timestamp(time.time() - self.max_age) if self.max_age else None, self.max_rows

    def prune(self) -> int:
        """Delete rows beyond the retention (at startup: the age bound moves on while no
        request comes); returns how many."""
        if not self.enabled:
            return 0
        try:
            return self.store.prune_requests(*self._bounds())
        except Exception:
            log.warning("could not prune the request log", exc_info=True)
            return 0

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record added so far is on disk (at shutdown, and for readers)."""
        if self._thread is None:
            return
        target = self._added
        self._wake.set()
        with self._progress:
            self._progress.wait_for(lambda: self._done >= target, timeout)

    def close(self) -> None:
        self.flush()
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
