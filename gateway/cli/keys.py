"""`keys`: API keys live in the local database, managed here and never over the network."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from gateway.cli.run import settings
from gateway.cli.tables import table
from gateway.errors import ServiceError
from gateway.service.service import Service


def cmd_keys(args: argparse.Namespace) -> int:
    service = Service(settings(args))
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
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
