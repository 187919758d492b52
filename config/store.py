"""The sqlite-utils database: the only module that opens it.

WAL journal, a busy timeout, one connection per thread; migrations are a list of small named
functions applied in order (sqlite_utils.Migrations).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config.files import FILE_MODE, private_dir, private_file

# sqlite-utils imports pandas (and pyarrow with it) when it is installed, only to store pandas
# values, which nothing here has: that was about a second of every CLI command's and server's
# start. It sees pandas as absent; anything that imports pandas later gets it as usual.
_hide_pandas = "pandas" not in sys.modules
if _hide_pandas:
    sys.modules["pandas"] = None  # type: ignore[assignment]
try:
    import sqlite_utils
    from sqlite_utils import Migrations
finally:
    if _hide_pandas:
        del sys.modules["pandas"]

migrations = Migrations("mlx_manager")


@migrations()
def create_profiles(db: sqlite_utils.Database) -> None:
    db.table("profiles").create(
        {
            "name": str,
            "model": str,
            "aliases": str,  # JSON list
            "temperature": float,
            "top_p": float,
            "max_tokens": int,
            "context_length": int,
            "system_prompt": str,
            "ttl": int,
            "pinned": int,
            "description": str,
            "created": str,
            "updated": str,
        },
        pk="name",
    )


@migrations()
def create_downloads(db: sqlite_utils.Database) -> None:
    db.table("downloads").create(
        {
            "id": str,
            "repo": str,
            "status": str,  # queued | running | done | failed | cancelled | interrupted
            "error": str,
            "bytes_done": int,
            "bytes_total": int,
            "created": str,
            "updated": str,
        },
        pk="id",
    )


@migrations()
def create_api_keys(db: sqlite_utils.Database) -> None:
    db.table("api_keys").create(
        {
            "name": str,
            "hash": str,  # sha256 hex of the key; the key itself is never stored
            "prefix": str,  # the key's first characters, to tell keys apart in listings
            "created": str,
            "last_used": str,
        },
        pk="name",
    )
    db.table("api_keys").create_index(["hash"], unique=True)


@migrations()
def add_profile_output_fields(db: sqlite_utils.Database) -> None:
    db.table("profiles").add_column("reasoning_format", str)  # separate | inline
    db.table("profiles").add_column("tool_parser", str)  # an mlx-lm tool parser module


@migrations()
def create_request_log(db: sqlite_utils.Database) -> None:
    db.table("requests").create(
        {
            "id": int,
            "request_id": str,  # also sent to the client as x-request-id
            "time": str,  # when the request arrived, ISO 8601 UTC
            "endpoint": str,  # /v1/chat/completions, /v1/completions, mcp:chat
            "model": str,  # the model that served it, else the name the request gave
            "profile": str,  # the profile (or alias) the request named
            "key_name": str,  # the API key's name
            "status": int,  # HTTP status; a stream that failed midway: its error's; gone: 499
            "error": str,
            "stream": int,
            "finish_reason": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cached_tokens": int,
            "ttft_ms": float,
            "duration_ms": float,
            "prompt": str,  # only with MLX_MANAGER_LOG_CONTENT=1
            "completion": str,
        },
        pk="id",
    )
    db.table("requests").create_index(["time"])
    db.table("requests").create_index(["model", "time"])


@migrations()
def add_profile_thinking_fields(db: sqlite_utils.Database) -> None:
    db.table("profiles").add_column("thinking", int)  # 1 on, 0 off, NULL the model's default
    db.table("profiles").add_column("reasoning_budget", int)  # most reasoning tokens


@migrations()
def create_responses(db: sqlite_utils.Database) -> None:
    """Stored /v1/responses (made with `store: true`), kept for MLX_MANAGER_RESPONSE_RETENTION."""
    db.table("responses").create(
        {
            "id": str,  # resp_...
            "time": str,  # when it was stored, in the request log's format (for pruning)
            "key_name": str,  # the API key that made it: only that key sees it
            "response": str,  # JSON: the response object, as its create returned it
            "input_items": str,  # JSON: every item of its prompt, its predecessors' included
        },
        pk="id",
    )
    db.table("responses").create_index(["time"])


@migrations()
def add_profile_embedding_fields(db: sqlite_utils.Database) -> None:
    db.table("profiles").add_column("pooling", str)  # embeddings: last | mean
    db.table("profiles").add_column("rerank", str)  # how a language model reranks: yes_no


REQUEST_COLUMNS = (
    "id, request_id, time, endpoint, model, profile, key_name, status, error, stream, "
    "finish_reason, prompt_tokens, completion_tokens, cached_tokens, ttft_ms, duration_ms"
)


class DatabaseFull(Exception):
    """A write failed because the disk (or its quota) under the database is full."""

    def __init__(self, folder: Path) -> None:
        super().__init__(
            f"The disk is full: cannot write the database in {folder}. Free space there and retry."
        )
        self.folder = folder


class Store:
    """Typed access to the database. Safe to share across threads: each thread gets its own
    connection (sqlite connections must not cross threads)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)
        # It holds key hashes (and prompts, with log_content). sqlite gives its -wal and -shm
        # files the database file's mode, so creating that 0600 covers them too.
        private_file(self.path)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(OSError):  # absent: sqlite creates them from the above
                os.chmod(f"{self.path}{suffix}", FILE_MODE)
        self._local = threading.local()
        migrations.apply(self.db)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(str(self.path), timeout=10)
            conn.execute("PRAGMA busy_timeout = 10000")
            db = sqlite_utils.Database(conn)
            db.enable_wal()
            self._local.db = db
        return db

    @contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so what a
        writer checks inside (a unique alias, an existing key name) stays true until it commits;
        a deferred transaction would instead fail when it upgraded to write. Nested calls join
        the outer transaction (sqlite-utils' own writes become savepoints inside it).

        A full disk raises DatabaseFull, with nothing written: the commit is inside the
        rollback's reach, as it is where WAL pages are written."""
        db = self.db
        if db.conn.in_transaction:
            yield db
            return
        try:
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.conn.commit()
            except BaseException:
                db.conn.rollback()
                raise
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
                raise DatabaseFull(self.path.parent) from e
            raise

    def version(self) -> tuple[int, ...]:
        """Changes whenever any connection, in any process, commits (in WAL mode a commit
        writes the -wal file, a checkpoint the database file): a 'has anything changed?' that
        costs two stat calls, not a query."""
        stamp: list[int] = []
        for path in (self.path, Path(f"{self.path}-wal")):
            try:
                st = os.stat(path)
                stamp += [st.st_mtime_ns, st.st_size]
            except FileNotFoundError:
                stamp += [0, 0]
        return tuple(stamp)

    # Profiles -------------------------------------------------------------------------------

    def profiles(self) -> list[dict[str, Any]]:
        return [_profile_row(r) for r in self.db.table("profiles").rows_where(order_by="name")]

    def profile(self, name: str) -> dict[str, Any] | None:
        rows = list(self.db.table("profiles").rows_where("name = ?", [name]))
        return _profile_row(rows[0]) if rows else None

    def save_profile(self, profile: dict[str, Any]) -> None:
        now = _now()
        row = dict(profile)
        row["aliases"] = json.dumps(row.get("aliases") or [])
        row["pinned"] = int(bool(row.get("pinned")))
        row.setdefault("created", now)
        row["updated"] = now
        with self.write() as db:
            existing = self.profile(row["name"])
            if existing is not None:
                row["created"] = existing["created"]
            db.table("profiles").upsert(row, pk="name")

    # Downloads ------------------------------------------------------------------------------

    def save_download(
        self,
        job_id: str,
        repo: str,
        status: str,
        error: str | None = None,
        bytes_done: int = 0,
        bytes_total: int = 0,
    ) -> None:
        row = {
            "id": job_id,
            "repo": repo,
            "status": status,
            "error": error,
            "bytes_done": bytes_done,
            "bytes_total": bytes_total,
            "updated": _now(),
        }
        with self.write():
            if self.db.table("downloads").count_where("id = ?", [job_id]):
                self.db.table("downloads").update(job_id, row)
            else:
                self.db.table("downloads").insert({**row, "created": row["updated"]})

    def unfinished_downloads(self) -> list[dict[str, Any]]:
        return list(
            self.db.table("downloads").rows_where(
                "status in ('queued', 'running')", order_by="created"
            )
        )

    def delete_profile(self, name: str) -> bool:
        with self.write() as db:
            cur = db.execute("DELETE FROM profiles WHERE name = ?", [name])
        return cur.rowcount > 0

    # API keys -------------------------------------------------------------------------------

    def api_keys(self) -> list[dict[str, Any]]:
        return list(self.db.table("api_keys").rows_where(order_by="created"))

    def add_api_key(self, name: str, digest: str, prefix: str) -> dict[str, Any]:
        row = {"name": name, "hash": digest, "prefix": prefix, "created": _now()}
        with self.write() as db:
            db.table("api_keys").insert({**row, "last_used": None})
        return {**row, "last_used": None}

    def delete_api_key(self, name: str) -> bool:
        with self.write() as db:
            cur = db.execute("DELETE FROM api_keys WHERE name = ?", [name])
        return cur.rowcount > 0

    def touch_api_key(self, name: str) -> None:
        with self.write() as db:
            db.execute("UPDATE api_keys SET last_used = ? WHERE name = ?", [_now(), name])

    # Request log -----------------------------------------------------------------------------

    def add_requests(self, rows: list[dict[str, Any]]) -> None:
        """Append request log rows, all in one transaction."""
        with self.write() as db:
            db.table("requests").insert_all(rows)

    def requests(
        self,
        *,
        model: str | None = None,
        key_name: str | None = None,
        endpoint: str | None = None,
        status: int | None = None,
        errors: bool = False,
        since: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
        content: bool = False,
    ) -> list[dict[str, Any]]:
        """Request log rows, newest first (oldest first after `after_id`, for following)."""
        where, args = ["1"], []
        for clause, value in (
            ("(model = ? OR profile = ?)", model),
            ("key_name = ?", key_name),
            ("endpoint = ?", endpoint),
            ("status = ?", status),
            ("time >= ?", since),
            ("id > ?", after_id),
        ):
            if value is not None:
                where.append(clause)
                args += [value] * clause.count("?")
        if errors:
            where.append("status >= 400")
        order = "id" if after_id is not None else "id DESC"
        columns = REQUEST_COLUMNS + (", prompt, completion" if content else "")
        sql = f"SELECT {columns} FROM requests WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?"
        rows = list(self._rows(sql, [*args, limit]))
        for r in rows:
            r["stream"] = bool(r["stream"])
        return rows

    def usage(self, since: str | None, by: tuple[str, ...]) -> list[dict[str, Any]]:
        """Totals over the request log since `since`, grouped by `by` (model, key_name)."""
        group = ", ".join(by)
        select = f"{group}, " if by else ""
        sql = f"""
            SELECT {select}
                count(*) AS requests,
                sum(status >= 400 AND status != 499) AS errors,
                sum(status = 499) AS cancelled,
                coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                coalesce(sum(completion_tokens), 0) AS completion_tokens,
                coalesce(sum(cached_tokens), 0) AS cached_tokens,
                round(avg(ttft_ms), 1) AS avg_ttft_ms,
                round(max(ttft_ms), 1) AS max_ttft_ms,
                round(avg(duration_ms), 1) AS avg_duration_ms,
                sum(CASE WHEN completion_tokens > 1 AND duration_ms > ttft_ms
                    THEN completion_tokens - 1 END) AS decoded_tokens,
                sum(CASE WHEN completion_tokens > 1 AND duration_ms > ttft_ms
                    THEN duration_ms - ttft_ms END) AS decode_ms
            FROM requests WHERE time >= ?
            {"GROUP BY " + group + " ORDER BY requests DESC" if by else ""}
        """
        rows = []
        for r in self._rows(sql, [since or ""]):
            decoded, ms = r.pop("decoded_tokens"), r.pop("decode_ms")
            r["tokens_per_second"] = round(decoded / (ms / 1000), 1) if decoded and ms else None
            rows.append(r)
        return rows

    def prune_requests(self, before: str | None, keep_rows: int | None) -> int:
        """Delete request log rows older than `before` and beyond the newest `keep_rows`."""
        deleted = 0
        with self.write() as db:
            if before is not None:
                deleted += db.execute("DELETE FROM requests WHERE time < ?", [before]).rowcount
            if keep_rows is not None:
                # Ids only grow: the newest keep_rows rows are those above max(id) - keep_rows.
                deleted += db.execute(
                    "DELETE FROM requests WHERE id <= (SELECT max(id) FROM requests) - ?",
                    [keep_rows],
                ).rowcount
        return deleted

    # Stored responses -----------------------------------------------------------------------

    def save_response(
        self,
        row: dict[str, Any],
        before: str | None = None,
        keep_rows: int | None = None,
    ) -> None:
        """Store one response (`id`, `time`, `key_name`, and JSON text `response` and
        `input_items`), and prune the others by age and count, in one transaction."""
        with self.write() as db:
            db.table("responses").insert(row)
            self.prune_responses(before, keep_rows)

    def response(self, response_id: str) -> dict[str, Any] | None:
        rows = list(self.db.table("responses").rows_where("id = ?", [response_id]))
        return rows[0] if rows else None

    def delete_response(self, response_id: str) -> bool:
        with self.write() as db:
            cur = db.execute("DELETE FROM responses WHERE id = ?", [response_id])
        return cur.rowcount > 0

    def prune_responses(self, before: str | None, keep_rows: int | None) -> int:
        """Delete stored responses older than `before` and beyond the newest `keep_rows`."""
        deleted = 0
        with self.write() as db:
            if before is not None:
                deleted += db.execute("DELETE FROM responses WHERE time < ?", [before]).rowcount
            if keep_rows is not None:
                # rowids only grow (max + 1): the newest rows have the highest ones.
                deleted += db.execute(
                    "DELETE FROM responses WHERE rowid <= (SELECT max(rowid) FROM responses) - ?",
                    [keep_rows],
                ).rowcount
        return deleted

    def _rows(self, sql: str, args: list[Any]) -> Iterator[dict[str, Any]]:
        cur = self.db.execute(sql, args)
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row, strict=True))


def _profile_row(row: dict[str, Any]) -> dict[str, Any]:
    """A profile as stored. Aliases that are not a JSON list of names (a row written by hand
    or by an older version) read as none, and `unreadable` says so: every reader can rely on
    the types, and the profiles listing can report the row instead of failing."""
    row = dict(row)
    raw = row.get("aliases") or "[]"
    try:
        aliases = json.loads(raw)
    except (ValueError, RecursionError):
        aliases = None
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        row["unreadable"] = {"aliases": f"stored as {raw[:100]!r}, not a JSON list of names"}
        aliases = []
    row["aliases"] = aliases
    row["pinned"] = bool(row.get("pinned"))
    if row.get("thinking") is not None:  # stored as an integer
        row["thinking"] = bool(row["thinking"])
    return row


def _now() -> str:
    return datetime.now(UTC).isoformat()


def timestamp(seconds: float) -> str:
    """The request log's time format: ISO 8601 UTC with milliseconds, so that text order is
    time order."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
