"""Watching a server: `ps` (loaded models), `logs` (the request log, a model's worker log)
and `usage` (the request log summed up)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.cli.run import interruptible, run
from gateway.cli.tables import Column, cell, duration, millis, moment, number, shown, size, table
from gateway.service.service import USAGE_GROUPS, Service

PS_COLUMNS: dict[str, Column] = {
    "model": ("MODEL", str),
    "state": ("STATE", str),
    "pid": ("PID", cell),
    "memory_bytes": ("MEMORY", size),
    "uptime_seconds": ("UPTIME", duration),
    "idle_seconds": ("IDLE", duration),
    "ttl_remaining_seconds": ("TTL LEFT", duration),
    "queued": ("QUEUE", cell),
    "in_flight": ("RUNNING", cell),
    "requests_served": ("SERVED", cell),
    "tokens_per_second": ("TOK/S", lambda v: f"{v:.1f}" if v else "0"),
}


def cmd_ps(args: argparse.Namespace) -> int:
    """Loaded models on the running server; --watch redraws every --interval seconds."""

    async def ps(service: Service) -> Any:
        while True:
            rows = await service.list_loaded()
            if not args.watch:
                return rows if args.json else _ps_table(rows, await service.memory())
            if args.json:
                print(json.dumps(rows), flush=True)
            else:
                screen = _ps_table(rows, await service.memory())
                clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
                stamp = time.strftime("%H:%M:%S")
                print(f"{clear}{stamp}  every {args.interval:g}s, Ctrl-C to stop", flush=True)
                print(screen, flush=True)
            await asyncio.sleep(args.interval)

    return interruptible(lambda: run(args, ps, server=True))


def _ps_table(rows: list[dict[str, Any]], memory: dict[str, int]) -> str:
    used = f"memory {size(memory['used_bytes'])} of {size(memory['budget_bytes'])} budget"
    if not rows:
        return f"no models loaded; {used}"
    return table(rows, PS_COLUMNS) + f"\n{used}"


REQUEST_COLUMNS: dict[str, Column] = {
    "time": ("TIME", moment),
    "request_id": ("ID", str),
    "endpoint": ("ENDPOINT", lambda v: v.removeprefix("/v1/")),
    "model": ("MODEL", cell),
    "profile": ("PROFILE", cell),
    "key_name": ("KEY", cell),
    "status": ("STATUS", cell),
    "prompt_tokens": ("PROMPT", cell),
    "completion_tokens": ("OUTPUT", cell),
    "cached_tokens": ("CACHED", cell),
    "ttft_ms": ("TTFT", millis),
    "duration_ms": ("TIME TAKEN", millis),
    "error": ("ERROR", cell),
}


def cmd_logs(args: argparse.Namespace) -> int:
    """The request log (filters, --follow); with --model, that model's worker log (or, with
    --requests too, its requests)."""
    if args.model and not args.requests:
        return interruptible(lambda: run(args, _worker_log(args)))
    filters = {
        "model": args.model,
        "key": args.key,
        "status": args.status,
        "errors_only": args.errors,
        "since": args.since,
    }

    async def requests(service: Service) -> Any:
        rows = list(reversed(await service.requests_log(**filters, limit=args.limit)))
        if not args.follow:
            if args.json or rows:
                return rows if args.json else table(rows, REQUEST_COLUMNS)
            off = not service.request_log_enabled
            return (
                "(none: the request log is off, MLX_MANAGER_LOG_RETENTION=0)" if off else "(none)"
            )
        last = _print_requests(rows, args.json, header=True, last=0)
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            rows = await service.requests_log(**filters, after_id=last, limit=1000)
            last = _print_requests(rows, args.json, header=False, last=last)

    return interruptible(lambda: run(args, requests))


FOLLOW_SECONDS = 0.5


# Column widths of `logs --follow`, which prints rows as they come and cannot measure them.
FOLLOW_WIDTHS = (12, 28, 16, 24, 12, 10, 6, 6, 6, 6, 7, 10, 0)


def _print_requests(rows: list[dict[str, Any]], as_json: bool, header: bool, last: int) -> int:
    """Print rows as they come (a fixed-width line each, or JSON lines); the last id seen."""

    def line(cells: Any) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, FOLLOW_WIDTHS, strict=True)).rstrip()

    if header and not as_json:
        print(line(h for h, _ in REQUEST_COLUMNS.values()), flush=True)
    for raw, row in zip(rows, shown(rows, REQUEST_COLUMNS), strict=True):
        print(json.dumps(raw) if as_json else line(row.values()), flush=True)
    return max([last, *(r["id"] for r in rows)])


def _worker_log(args: argparse.Namespace) -> Callable[[Service], Awaitable[Any]]:
    async def show(service: Service) -> Any:
        found = await service.worker_logs(args.model, args.limit)
        if args.json and not args.follow:
            return found
        for line in found["lines"]:
            print(line, flush=True)
        if not args.follow:
            return None
        path = Path(found["file"])
        position = path.stat().st_size if path.exists() else 0
        while True:  # tail -F: the file may be rotated or created meanwhile
            await asyncio.sleep(FOLLOW_SECONDS)
            try:
                length = path.stat().st_size
            except FileNotFoundError:
                continue
            if length < position:
                position = 0  # rotated: a new file
            if length > position:
                with path.open(errors="replace") as f:
                    f.seek(position)
                    print(f.read(), end="", flush=True)
                    position = f.tell()

    return show


USAGE_GROUP_HEADINGS = {"model": "MODEL", "key_name": "KEY"}
USAGE_COLUMNS: dict[str, Column] = {
    "requests": ("REQUESTS", cell),
    "errors": ("ERRORS", lambda v: number(v or 0)),
    "cancelled": ("CANCELLED", lambda v: number(v or 0)),
    "prompt_tokens": ("PROMPT", cell),
    "completion_tokens": ("OUTPUT", cell),
    "cached_tokens": ("CACHED", cell),
    "avg_ttft_ms": ("TTFT AVG", millis),
    "max_ttft_ms": ("TTFT MAX", millis),
    "avg_duration_ms": ("TIME AVG", millis),
    "tokens_per_second": ("TOK/S", lambda v: "-" if v is None else f"{v:.1f}"),
}


def _group(value: Any) -> str:
    return "(none)" if value is None else str(value)


def cmd_usage(args: argparse.Namespace) -> int:
    """Usage from the request log over a window, per model, per key or both."""

    async def usage(service: Service) -> Any:
        stats = await service.usage_stats(args.since, args.by)
        if args.json:
            return stats
        groups = USAGE_GROUPS[args.by]
        total = {**dict.fromkeys(groups, "(all)"), **stats["total"]}
        # Requests refused before they named a model (or without a key) group under none.
        columns = {g: (USAGE_GROUP_HEADINGS.get(g, g.upper()), _group) for g in groups}
        return f"since {moment(stats['since'])}\n" + table(
            [*stats["rows"], total], columns | USAGE_COLUMNS
        )

    return run(args, usage)
