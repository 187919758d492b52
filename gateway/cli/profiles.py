"""`profiles`: list, show, create, update and delete profiles."""

from __future__ import annotations

import argparse
import sys

from gateway.cli.run import run

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
        return run(args, lambda m: m.list_profiles())
    if not args.name:
        print(f"mlx-manager: profiles {action} needs a NAME", file=sys.stderr)
        return 2
    if action == "show":
        return run(args, lambda m: m.get_profile(args.name))
    if action == "create":
        return run(args, lambda m: m.create_profile({"name": args.name, **fields}))
    if action == "update":
        return run(args, lambda m: m.update_profile(args.name, fields))
    return run(args, lambda m: m.delete_profile(args.name))
