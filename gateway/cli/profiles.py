"""`profiles`: list, show, create, update and delete profiles. Its options are the profile's
fields, made from the Profile model (names, types, help), as the MCP tools' parameters are;
the service validates the values, for every face alike."""

from __future__ import annotations

import argparse
import sys
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from gateway.catalog.profiles import FIELDS, Profile
from gateway.cli.run import run
from gateway.cli.tables import Column, age, cell, duration

# The list's columns; `profiles show NAME` has every field.
PROFILE_COLUMNS: dict[str, Column] = {
    "name": ("NAME", str),
    "model": ("MODEL", cell),
    "aliases": ("ALIASES", cell),
    "temperature": ("TEMP", cell),
    "top_p": ("TOP P", cell),
    "max_tokens": ("MAX TOKENS", cell),
    "context_length": ("CONTEXT", cell),
    "ttl": ("TTL", lambda v: "" if v is None else "never" if v == 0 else duration(v)),
    "pinned": ("PINNED", lambda v: "yes" if v else ""),
    "updated": ("UPDATED", age),
    "description": ("DESCRIPTION", cell),
    "error": ("ERROR", cell),
}


def add_field_options(parser: argparse.ArgumentParser) -> None:
    """An option per profile field but the name: `--top-p 0.9` for top_p, `--pinned` and
    `--no-pinned` for a flag, and a list field's option named in the singular and repeated
    (`--alias a --alias b` for aliases). Each option's value lands in its field's name; one
    left out is None ("leave it as it is")."""
    for name in FIELDS:
        field = Profile.model_fields[name]
        kind = _plain(field.annotation)
        text = (field.description or "").replace("%", "%%")
        option = f"--{name.replace('_', '-')}"
        if kind is bool:
            parser.add_argument(
                option, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif get_origin(kind) is list:
            (item,) = get_args(kind)
            parser.add_argument(
                _singular(option),
                dest=name,
                action="append",
                type=_plain(item),
                metavar=_singular(name).upper(),
                help=f"{text} Repeatable.",
            )
        elif get_origin(kind) is Literal:
            values = get_args(kind)
            parser.add_argument(
                option,
                dest=name,
                type=type(values[0]),
                metavar="{" + ",".join(map(str, values)) + "}",
                help=text,
            )
        elif kind in (str, int, float):
            parser.add_argument(option, dest=name, type=kind, help=text)
        else:
            raise TypeError(f"profile field {name!r} of type {kind!r} has no CLI option yet")


def _plain(annotation: Any) -> Any:
    """The type under `X | None` and Annotated[X, bounds]: float for `Temperature | None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _singular(name: str) -> str:
    return name.removesuffix("es") if name.endswith("ses") else name.removesuffix("s")


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The profile fields the command line set."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}


def cmd_profiles(args: argparse.Namespace) -> int:
    fields = given_fields(args)
    action = args.action
    if action == "list":
        return run(args, lambda m: m.list_profiles(), columns=PROFILE_COLUMNS)
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
