"""Models: list and inspect local ones, load and unload them on the running server, search the
hub, download and delete."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.cli.run import run
from gateway.errors import ServiceError
from gateway.service.service import Service


def cmd_models(args: argparse.Namespace) -> int:
    if args.name:
        return run(args, lambda m: m.model_info(args.name))
    return run(args, lambda m: m.list_models())


def cmd_load(args: argparse.Namespace) -> int:
    return run(args, lambda m: m.load(args.name, _progress_line), server=True)


async def _progress_line(state: str, elapsed: float, message: str) -> None:
    end = "\n" if state == "ready" else ""
    print(f"\r{message}", end=end, file=sys.stderr, flush=True)


def cmd_unload(args: argparse.Namespace) -> int:
    return run(args, lambda m: m.unload(args.name, force=args.force))


def cmd_search(args: argparse.Namespace) -> int:
    return run(args, lambda m: m.search_models(args.query, args.author, args.limit))


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

    return run(args, pull)


def cmd_rm(args: argparse.Namespace) -> int:
    return run(args, lambda m: m.delete_model(args.name, unload=args.unload))
