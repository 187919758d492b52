"""The `mlx-manager` command."""

from __future__ import annotations

import argparse
import sys

from config.settings import SettingsError
from gateway.cli.autostart import cmd_service
from gateway.cli.keys import cmd_keys
from gateway.cli.models import (
    cmd_downloads,
    cmd_load,
    cmd_models,
    cmd_pull,
    cmd_rm,
    cmd_search,
    cmd_unload,
)
from gateway.cli.monitor import cmd_logs, cmd_ps, cmd_usage
from gateway.cli.profiles import add_field_options, cmd_profiles
from gateway.cli.serve import cmd_mcp, cmd_serve
from gateway.service.service import USAGE_GROUPS


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The options of `serve`, which `service install` writes into the service it installs."""
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8080)")
    parser.add_argument("--home", help="data folder (default MLX_MANAGER_HOME or ~/.mlx-manager)")
    parser.add_argument(
        "--model-dir",
        action="append",
        help="a folder of model folders (repeatable; replaces the setting)",
    )
    parser.add_argument(
        "--no-demo",
        action="store_true",
        help="do not build the offline demo model when no model is found",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="allow binding beyond loopback with no API key (anyone who can reach it can use it)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand with its options; each sets `func`, the command that runs it."""
    parser = argparse.ArgumentParser(prog="mlx-manager", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve local MLX models behind an OpenAI-compatible API")
    add_serve_options(serve)
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
    usage.add_argument("--by", choices=list(USAGE_GROUPS), default="model")
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
    downloads = client("downloads", "downloads on the running server, with their progress")
    downloads.add_argument("--cancel", metavar="ID", help="cancel the download with this id")
    downloads.set_defaults(func=cmd_downloads)
    rm = client("rm", "delete a downloaded model from the Hugging Face cache")
    rm.add_argument("name")
    rm.add_argument("--unload", action="store_true", help="unload it first if it is loaded")
    rm.set_defaults(func=cmd_rm)
    profiles = client("profiles", "list, show, create, update or delete profiles")
    profiles.add_argument(
        "action", choices=["list", "show", "create", "update", "delete"], nargs="?", default="list"
    )
    profiles.add_argument("name", nargs="?")
    add_field_options(profiles)
    profiles.set_defaults(func=cmd_profiles)
    keys = client("keys", "create, list or revoke API keys")
    keys.add_argument("action", choices=["create", "list", "revoke"], nargs="?", default="list")
    keys.add_argument("positional_name", nargs="?", metavar="NAME")
    keys.add_argument("--name", help="the key's name (for create and revoke)")
    keys.set_defaults(func=cmd_keys)
    service = sub.add_parser(
        "service", help="run `serve` at login: a systemd user unit or a launchd agent"
    )
    service.add_argument("action", choices=["install", "uninstall", "status"])
    add_serve_options(service)
    service.add_argument("--json", action="store_true", help="print JSON (status)")
    service.add_argument(
        "--platform",
        choices=["linux", "macos"],
        help="write a systemd unit (linux) or a launchd plist (macos); default: this system's",
    )
    service.add_argument(
        "--print", action="store_true", help="install: print the file instead of writing it"
    )
    service.add_argument(
        "--files-only",
        action="store_true",
        help="only write or remove the file; do not call systemctl or launchctl",
    )
    service.set_defaults(func=cmd_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"mlx-manager: {e}", file=sys.stderr)
        return 2
