"""How a client command reaches the service: its settings from the flags, its work run on the
running server (or this process's own workers), the result printed as a table or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from config.settings import Settings, load_settings
from gateway.cli.tables import Column, table
from gateway.errors import ServiceError
from gateway.service.connect import connect
from gateway.service.service import Service


def settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        {
            "home": getattr(args, "home", None),
            "port": getattr(args, "port", None),
            "host": getattr(args, "host", None),
        }
    )


def run(
    args: argparse.Namespace,
    work: Callable[[Service], Awaitable[Any]],
    server: bool = False,
    columns: dict[str, Column] | None = None,
) -> int:
    """Run `work` on the service: the running server's workers when one is up, otherwise
    this process's own (or, with `server`, an error saying to start one). Its result is
    printed as JSON with --json, else as a table (of `columns`) or as it is, if text."""

    async def main() -> Any:
        service = await connect(settings(args), server_only=server)
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
        print(json.dumps(result, indent=2) if args.json else table(result, columns))
    return 0


def interruptible(command: Callable[[], int]) -> int:
    """Ctrl-C is how --watch and --follow end: a normal exit, not a traceback."""
    try:
        return command()
    except KeyboardInterrupt:
        return 0
