"""The `mlx-manager` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from config.settings import Settings, SettingsError, load_settings
from gateway.catalog.local import scan_local_models
from gateway.errors import ServiceError
from gateway.observe.logs import setup_logging
from gateway.service.connect import connect
from gateway.service.keys import check_bind
from gateway.service.service import Service

DEMO_MODEL = "demo-random"


def ensure_demo_model(settings: Settings) -> str | None:
    """With no model anywhere, build a tiny offline demo model so `serve` has something to
    answer with. Returns its name when one was built or already present alone."""
    if scan_local_models(settings.hf_cache, settings.all_model_dirs()):
        return None
    from gateway.catalog.builder import build_model

    path = settings.own_models_dir / DEMO_MODEL
    print(
        f"No local models found: building the offline demo model '{DEMO_MODEL}' in {path}.\n"
        "Its weights are random, so its answers are gibberish; it shows that the gateway works.\n"
        "Add real models to the Hugging Face cache or MLX_MANAGER_MODEL_DIRS.",
        file=sys.stderr,
    )
    build_model(path)
    return DEMO_MODEL


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.http.app import create_app
    from gateway.http.connections import http_protocol
    from mcp_tools.server import build_mcp

    settings = load_settings(
        {
            "host": args.host,
            "port": args.port,
            "home": args.home,
            "model_dirs": args.model_dir or None,
            "insecure_no_auth": args.insecure_no_auth or None,
        }
    )
    service = Service(settings)
    try:
        check_bind(settings, service.keys)
    except ServiceError as e:
        print(f"mlx-manager: {e.message}", file=sys.stderr)
        return 2
    listener = setup_logging(settings)
    if not args.no_demo:
        ensure_demo_model(settings)
    auth = "API key required" if service.keys.required() else "no API key required"
    print(
        f"mlx-manager serving on http://{settings.host}:{settings.port}/v1 ({auth})",
        file=sys.stderr,
    )
    try:
        uvicorn.run(
            create_app(settings, service, build_mcp(service)),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=10,
            access_log=False,  # our own line per request has its id, model, tokens and timing
            # Longer than clients keep idle connections (httpx, and so the OpenAI SDK: 5 s), so
            # the server never closes one just as a client reuses it (a spurious ReadError).
            timeout_keep_alive=65,
            # Slow clients: a deadline for the headers (the body's is a middleware), and a
            # limit on connections (uvicorn refuses with 503 from the limit on, so +1).
            http=http_protocol(settings.request_read_timeout),
            limit_concurrency=settings.max_connections + 1 if settings.max_connections else None,
        )
    finally:
        listener.stop()  # writes what is still queued
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        {
            "home": getattr(args, "home", None),
            "port": getattr(args, "port", None),
            "host": getattr(args, "host", None),
        }
    )


def _run(
    args: argparse.Namespace, work: Callable[[Service], Awaitable[Any]], server: bool = False
) -> int:
    """Run `work` on the service: the running server's workers when one is up, otherwise
    this process's own (or, with `server`, an error saying to start one)."""

    async def main() -> Any:
        service = await connect(_settings(args), server_only=server)
        try:
            return await work(service)
        finally:
            await service.close()

    try:
        result = asyncio.run(main())
    except ServiceError as e:
        print(f"mlx-manager: {e.message}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


def _table(result: Any) -> str:
    """Rows of dicts as an aligned table; anything else as key: value lines."""
    rows = result if isinstance(result, list) else None
    if rows is None:
        return "\n".join(f"{k}: {v}" for k, v in result.items())
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def cmd_mcp(args: argparse.Namespace) -> int:
    """MCP over stdio: the same tools as /mcp, on the running server's workers if one is up."""
    from mcp_tools.server import build_mcp

    settings = _settings(args)
    logging.basicConfig(level="WARNING", stream=sys.stderr)  # stdout carries the protocol

    async def main() -> None:
        service = await connect(settings)
        await service.start()
        try:
            await build_mcp(service).run_stdio_async()
        finally:
            await service.close()

    asyncio.run(main())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.name:
        return _run(args, lambda m: m.model_info(args.name))
    return _run(args, lambda m: m.list_models())


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float | None) -> str:
    """45s, 3m20s, 2h05m, 3d4h: as `ps` and `docker ps` show ages."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


Column = tuple[str, Callable[[Any], str]]  # (heading, how a person reads the field)
PS_COLUMNS: dict[str, Column] = {
    "model": ("MODEL", str),
    "state": ("STATE", str),
    "pid": ("PID", _cell),
    "memory_bytes": ("MEMORY", _bytes),
    "uptime_seconds": ("UPTIME", _duration),
    "idle_seconds": ("IDLE", _duration),
    "ttl_remaining_seconds": ("TTL LEFT", _duration),
    "queued": ("QUEUE", _cell),
    "in_flight": ("RUNNING", _cell),
    "requests_served": ("SERVED", _cell),
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

    return _interruptible(lambda: _run(args, ps, server=True))


def _ps_table(rows: list[dict[str, Any]], memory: dict[str, int]) -> str:
    used = f"memory {_bytes(memory['used_bytes'])} of {_bytes(memory['budget_bytes'])} budget"
    if not rows:
        return f"no models loaded; {used}"
    return _table(_shown(rows, PS_COLUMNS)) + f"\n{used}"


def _interruptible(run: Callable[[], int]) -> int:
    """Ctrl-C is how --watch and --follow end: a normal exit, not a traceback."""
    try:
        return run()
    except KeyboardInterrupt:
        return 0


REQUEST_COLUMNS: dict[str, Column] = {
    "time": ("TIME", lambda v: v.replace("T", " ")[:19]),
    "request_id": ("ID", str),
    "endpoint": ("ENDPOINT", lambda v: v.removeprefix("/v1/")),
    "model": ("MODEL", _cell),
    "profile": ("PROFILE", _cell),
    "key_name": ("KEY", _cell),
    "status": ("STATUS", _cell),
    "prompt_tokens": ("PROMPT", _cell),
    "completion_tokens": ("OUTPUT", _cell),
    "cached_tokens": ("CACHED", _cell),
    "ttft_ms": ("TTFT", lambda v: "-" if v is None else f"{v:.0f}ms"),
    "duration_ms": ("TIME TAKEN", lambda v: "-" if v is None else f"{v / 1000:.2f}s"),
    "error": ("ERROR", lambda v: "" if v is None else v if len(v) <= 60 else v[:57] + "..."),
}


def _shown(rows: list[dict[str, Any]], columns: dict[str, Column]) -> list[dict[str, str]]:
    """Rows as a person reads them: each field under its heading, in its own format."""
    return [{heading: show(r.get(f)) for f, (heading, show) in columns.items()} for r in rows]


def cmd_logs(args: argparse.Namespace) -> int:
    """The request log (filters, --follow); with --model, that model's worker log (or, with
    --requests too, its requests)."""
    if args.model and not args.requests:
        return _interruptible(lambda: _run(args, _worker_log(args)))
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
                return rows if args.json else _table(_shown(rows, REQUEST_COLUMNS))
            off = not service.request_log_enabled
            return (
                "(none: the request log is off, MLX_MANAGER_LOG_RETENTION=0)" if off else "(none)"
            )
        last = _print_requests(rows, args.json, header=True, last=0)
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            rows = await service.requests_log(**filters, after_id=last, limit=1000)
            last = _print_requests(rows, args.json, header=False, last=last)

    return _interruptible(lambda: _run(args, requests))


FOLLOW_SECONDS = 0.5


# Column widths of `logs --follow`, which prints rows as they come and cannot measure them.
FOLLOW_WIDTHS = (19, 28, 16, 24, 12, 10, 6, 6, 6, 6, 7, 10, 0)


def _print_requests(rows: list[dict[str, Any]], as_json: bool, header: bool, last: int) -> int:
    """Print rows as they come (a fixed-width line each, or JSON lines); the last id seen."""

    def line(cells: Any) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, FOLLOW_WIDTHS, strict=True)).rstrip()

    if header and not as_json:
        print(line(h for h, _ in REQUEST_COLUMNS.values()), flush=True)
    for raw, row in zip(rows, _shown(rows, REQUEST_COLUMNS), strict=True):
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
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < position:
                position = 0  # rotated: a new file
            if size > position:
                with path.open(errors="replace") as f:
                    f.seek(position)
                    print(f.read(), end="", flush=True)
                    position = f.tell()

    return show


def cmd_usage(args: argparse.Namespace) -> int:
    """Usage from the request log over a window, per model, per key or both."""

    async def usage(service: Service) -> Any:
        stats = await service.usage_stats(args.since, args.by)
        if args.json:
            return stats
        groups = {"model": ["model"], "key": ["key_name"], "model,key": ["model", "key_name"]}
        total = {**dict.fromkeys(groups.get(args.by, []), "(all)"), **stats["total"]}
        return f"since {stats['since']}\n" + _table([*stats["rows"], total])

    return _run(args, usage)


def cmd_load(args: argparse.Namespace) -> int:
    return _run(args, lambda m: m.load(args.name, _progress_line), server=True)


async def _progress_line(state: str, elapsed: float, message: str) -> None:
    end = "\n" if state == "ready" else ""
    print(f"\r{message}", end=end, file=sys.stderr, flush=True)


def cmd_unload(args: argparse.Namespace) -> int:
    return _run(args, lambda m: m.unload(args.name, force=args.force))


def cmd_search(args: argparse.Namespace) -> int:
    return _run(args, lambda m: m.search_models(args.query, args.author, args.limit))


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a model with a progress bar (in the running server when one is up)."""
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=args.name, file=sys.stderr)

    async def progress(job: dict[str, Any]) -> None:
        if job["bytes_total"] and bar.total != job["bytes_total"]:
            bar.total = job["bytes_total"]
        bar.update(job["bytes_done"] - bar.n)

    async def pull(service: Service) -> dict[str, Any]:
        try:
            job = await service.download_model(args.name, progress)
        finally:
            bar.close()
        if job["status"] != "done":
            raise ServiceError(f"Download of {args.name} {job['status']}: {job['error']}")
        return job

    return _run(args, pull)


def cmd_rm(args: argparse.Namespace) -> int:
    return _run(args, lambda m: m.delete_model(args.name, unload=args.unload))


PROFILE_FIELDS = {
    "model": str,
    "temperature": float,
    "top_p": float,
    "max_tokens": int,
    "context_length": int,
    "system_prompt": str,
    "ttl": float,
    "description": str,
    "reasoning_format": str,
    "tool_parser": str,
}


def cmd_profiles(args: argparse.Namespace) -> int:
    fields = {k: getattr(args, k) for k in PROFILE_FIELDS if getattr(args, k, None) is not None}
    if getattr(args, "alias", None):
        fields["aliases"] = args.alias
    if getattr(args, "pinned", None) is not None:
        fields["pinned"] = args.pinned
    action = args.action
    if action == "list":
        return _run(args, lambda m: m.list_profiles())
    if not args.name:
        print(f"mlx-manager: profiles {action} needs a NAME", file=sys.stderr)
        return 2
    if action == "show":
        return _run(args, lambda m: m.get_profile(args.name))
    if action == "create":
        return _run(args, lambda m: m.create_profile({"name": args.name, **fields}))
    if action == "update":
        return _run(args, lambda m: m.update_profile(args.name, fields))
    return _run(args, lambda m: m.delete_profile(args.name))


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys live in the local database: managed here, never over the network."""
    service = Service(_settings(args))
    name = args.name or args.positional_name
    try:
        if args.action == "list":
            result: Any = asyncio.run(service.list_keys())
        elif not name:
            print(f"mlx-manager: keys {args.action} needs --name NAME", file=sys.stderr)
            return 2
        elif args.action == "create":
            result = asyncio.run(service.create_key(name))
            if not args.json:
                print(
                    f"Created API key '{name}'. Copy it now: it is not shown again.\n\n"
                    f"  {result['key']}\n\n"
                    "Clients send it as 'Authorization: Bearer KEY' (the OpenAI SDK's api_key). "
                    "Every request now needs a key.",
                )
                return 0
        else:
            result = asyncio.run(service.revoke_key(name))
    except ServiceError as e:
        print(f"mlx-manager: {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-manager", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve local MLX models behind an OpenAI-compatible API")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--home", help="data folder (default MLX_MANAGER_HOME or ~/.mlx-manager)")
    serve.add_argument(
        "--model-dir",
        action="append",
        help="a folder of model folders (repeatable; replaces the setting)",
    )
    serve.add_argument(
        "--no-demo",
        action="store_true",
        help="do not build the offline demo model when no model is found",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="allow binding beyond loopback with no API key (anyone who can reach it can use it)",
    )
    serve.set_defaults(func=cmd_serve)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--port", type=int, help="port of the server to talk to (default 8080)")
        p.add_argument("--home", help="data folder (default MLX_MANAGER_HOME)")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    client("mcp", "MCP tools over stdio (for MCP clients)").set_defaults(func=cmd_mcp)
    models = client("models", "list local models, or inspect one")
    models.add_argument("name", nargs="?", help="a model to inspect")
    models.set_defaults(func=cmd_models)
    ps = client("ps", "loaded models on the running server")
    ps.add_argument("--watch", "-w", action="store_true", help="redraw until Ctrl-C")
    ps.add_argument("--interval", type=_positive, default=2.0, help="seconds between redraws")
    ps.set_defaults(func=cmd_ps)
    logs = client(
        "logs",
        "the request log; with --model, that model's worker log (--requests: its requests)",
    )
    logs.add_argument("--model", help="a model or profile: its worker log (load, errors, crash)")
    logs.add_argument(
        "--requests", action="store_true", help="with --model: its requests, not its worker log"
    )
    logs.add_argument("--key", help="only requests made with this API key (its name)")
    logs.add_argument("--status", type=int, help="only requests with this status (499: gone)")
    logs.add_argument("--errors", action="store_true", help="only failed requests")
    logs.add_argument("--since", help="only requests since: '1h', '7d' or an ISO time")
    logs.add_argument(
        "-n", "--limit", type=int, default=50, help="rows (or worker log lines) to show"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    logs.set_defaults(func=cmd_logs)
    usage = client("usage", "usage from the request log, per model or API key")
    usage.add_argument("--since", default="24h", help="window: '1h', '7d' or an ISO time")
    usage.add_argument("--by", choices=["model", "key", "model,key", "total"], default="model")
    usage.set_defaults(func=cmd_usage)
    load = client("load", "load a model on the running server")
    load.add_argument("name")
    load.set_defaults(func=cmd_load)
    unload = client("unload", "unload a model on the running server")
    unload.add_argument("name")
    unload.add_argument("--force", action="store_true", help="cancel running requests")
    unload.set_defaults(func=cmd_unload)
    search = client("search", "search the Hugging Face hub for MLX models")
    search.add_argument("query", nargs="?", default="")
    search.add_argument("--author", help="organization, e.g. mlx-community")
    search.add_argument("--limit", type=int, default=20)
    search.set_defaults(func=cmd_search)
    pull = client("pull", "download a model from the Hugging Face hub")
    pull.add_argument("name", help="hub id, e.g. mlx-community/Qwen3-0.6B-4bit")
    pull.set_defaults(func=cmd_pull)
    rm = client("rm", "delete a downloaded model from the Hugging Face cache")
    rm.add_argument("name")
    rm.add_argument("--unload", action="store_true", help="unload it first if it is loaded")
    rm.set_defaults(func=cmd_rm)
    profiles = client("profiles", "list, show, create, update or delete profiles")
    profiles.add_argument(
        "action", choices=["list", "show", "create", "update", "delete"], nargs="?", default="list"
    )
    profiles.add_argument("name", nargs="?")
    for field, kind in PROFILE_FIELDS.items():
        profiles.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind)
    profiles.add_argument("--alias", action="append", help="an alias (repeatable)")
    profiles.add_argument("--pinned", action=argparse.BooleanOptionalAction, default=None)
    profiles.set_defaults(func=cmd_profiles)
    keys = client("keys", "create, list or revoke API keys")
    keys.add_argument("action", choices=["create", "list", "revoke"], nargs="?", default="list")
    keys.add_argument("positional_name", nargs="?", metavar="NAME")
    keys.add_argument("--name", help="the key's name (for create and revoke)")
    keys.set_defaults(func=cmd_keys)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"mlx-manager: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
