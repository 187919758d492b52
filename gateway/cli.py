"""The `mlx-manager` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from config.settings import Settings, SettingsError, load_settings
from gateway.errors import ServiceError
from gateway.hub import scan_local_models
from gateway.keys import check_bind
from gateway.manager import Manager, RemoteManager, running_server

DEMO_MODEL = "demo-random"


def ensure_demo_model(settings: Settings) -> str | None:
    """With no model anywhere, build a tiny offline demo model so `serve` has something to
    answer with. Returns its name when one was built or already present alone."""
    if scan_local_models(settings.hf_cache, settings.all_model_dirs()):
        return None
    from gateway.model_builder import build_model

    path = settings.own_models_dir / DEMO_MODEL
    print(
        f"No local models found: building the offline demo model '{DEMO_MODEL}' in {path}.\n"
        "Its weights are random, so its answers are gibberish; it shows that the gateway works.\n"
        "Add real models to the Hugging Face cache or MLX_MANAGER_MODEL_DIRS.",
        file=sys.stderr,
    )
    build_model(path)
    return DEMO_MODEL


def setup_logging(settings: Settings) -> None:
    """Log to the terminal and to MLX_MANAGER_HOME/logs/mlx-manager.log (rotated)."""
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    file = logging.handlers.RotatingFileHandler(
        settings.logs_dir / "mlx-manager.log", maxBytes=10_000_000, backupCount=3
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(), file],
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = load_settings(
        {
            "host": args.host,
            "port": args.port,
            "home": args.home,
            "model_dirs": args.model_dir or None,
            "insecure_no_auth": args.insecure_no_auth or None,
        }
    )
    manager = Manager(settings)
    try:
        check_bind(settings, manager.keys)
    except ServiceError as e:
        print(f"mlx-manager: {e.message}", file=sys.stderr)
        return 2
    setup_logging(settings)
    if not args.no_demo:
        ensure_demo_model(settings)
    auth = "API key required" if manager.keys.required() else "no API key required"
    print(
        f"mlx-manager serving on http://{settings.host}:{settings.port}/v1 ({auth})",
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(settings, manager),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        # Longer than clients keep idle connections (httpx, and so the OpenAI SDK: 5 s), so
        # the server never closes one just as a client reuses it (a spurious ReadError).
        timeout_keep_alive=65,
    )
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        {
            "home": getattr(args, "home", None),
            "port": getattr(args, "port", None),
            "host": getattr(args, "host", None),
        }
    )


async def _manager(settings: Settings) -> Manager:
    """The running server's workers when one is up; otherwise this process's own."""
    url = await running_server(settings)
    return RemoteManager(settings, url) if url else Manager(settings)


def _run(args: argparse.Namespace, work: Callable[[Manager], Awaitable[Any]]) -> int:
    async def main() -> Any:
        manager = await _manager(_settings(args))
        try:
            return await work(manager)
        finally:
            await manager.close()

    try:
        result = asyncio.run(main())
    except ServiceError as e:
        print(f"mlx-manager: {e.message}", file=sys.stderr)
        return 1
    if result is not None:
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
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
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
        manager = await _manager(settings)
        await manager.start()
        try:
            await build_mcp(manager).run_stdio_async()
        finally:
            await manager.close()

    asyncio.run(main())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.name:
        return _run(args, lambda m: m.model_info(args.name))
    return _run(args, lambda m: m.list_models())


def cmd_ps(args: argparse.Namespace) -> int:
    columns = (
        "model",
        "state",
        "pid",
        "memory_bytes",
        "uptime_seconds",
        "idle_seconds",
        "ttl_remaining_seconds",
        "in_flight",
        "queued",
        "requests_served",
    )

    async def ps(manager: Manager) -> list[dict[str, Any]]:
        if not isinstance(manager, RemoteManager):
            raise ServiceError(
                "No mlx-manager server is running here; start one with `mlx-manager serve`."
            )
        rows = await manager.list_loaded()
        return rows if args.json else [{c: r.get(c) for c in columns} for r in rows]

    return _run(args, ps)


def cmd_load(args: argparse.Namespace) -> int:
    async def load(manager: Manager) -> dict[str, Any]:
        if not isinstance(manager, RemoteManager):
            raise ServiceError(
                "No mlx-manager server is running here to load the model into; "
                "start one with `mlx-manager serve`."
            )
        return await manager.load(args.name, _progress_line)

    return _run(args, load)


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

    async def pull(manager: Manager) -> dict[str, Any]:
        try:
            job = await manager.download_model(args.name, progress)
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
        return _run(args, lambda m: _async(m.list_profiles()))
    if not args.name:
        print(f"mlx-manager: profiles {action} needs a NAME", file=sys.stderr)
        return 2
    if action == "show":
        return _run(args, lambda m: _async(m.get_profile(args.name)))
    if action == "create":
        return _run(args, lambda m: m.create_profile({"name": args.name, **fields}))
    if action == "update":
        return _run(args, lambda m: m.update_profile(args.name, fields))
    return _run(args, lambda m: _async(m.delete_profile(args.name)))


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys live in the local database: managed here, never over the network."""
    manager = Manager(_settings(args))
    name = args.name or args.positional_name
    try:
        if args.action == "list":
            result: Any = manager.list_keys()
        elif not name:
            print(f"mlx-manager: keys {args.action} needs --name NAME", file=sys.stderr)
            return 2
        elif args.action == "create":
            result = manager.create_key(name)
            if not args.json:
                print(
                    f"Created API key '{name}'. Copy it now: it is not shown again.\n\n"
                    f"  {result['key']}\n\n"
                    "Clients send it as 'Authorization: Bearer KEY' (the OpenAI SDK's api_key). "
                    "Every request now needs a key.",
                )
                return 0
        else:
            result = manager.revoke_key(name)
    except ServiceError as e:
        print(f"mlx-manager: {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


async def _async(value: Any) -> Any:
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
    client("ps", "loaded models on the running server").set_defaults(func=cmd_ps)
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
