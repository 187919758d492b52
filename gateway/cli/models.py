"""Models: list and inspect local ones, load and unload them on the running server, search the
hub, download (with a progress line), list and cancel downloads, and delete."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.monitor import PS_COLUMNS
from gateway.cli.progress import ProgressLine, download_text
from gateway.cli.run import run
from gateway.cli.tables import Column, age, cell, duration, size, table
from gateway.errors import ServiceError
from gateway.service.service import Service

# The list's columns (where a model lives is in `models NAME`).
MODEL_COLUMNS: dict[str, Column] = {
    "id": ("MODEL", str),
    "family": ("FAMILY", cell),
    "quantization_bits": ("QUANT", lambda v: "" if v is None else f"{v}-bit"),
    "context_length": ("CONTEXT", lambda v: "" if v is None else f"{v:,}"),
    "size_bytes": ("SIZE", size),
    "loaded": ("LOADED", cell),
    "description": ("DESCRIPTION", cell),
}

SEARCH_COLUMNS: dict[str, Column] = {
    "id": ("MODEL", str),
    "size": ("SIZE", str),  # "~" before an estimate (made from the name)
    "fits_memory_budget": ("FITS", cell),
    "downloaded": ("DOWNLOADED", cell),
    "downloads": ("DOWNLOADS", lambda v: f"{v:,}"),
    "likes": ("LIKES", cell),
    "last_modified": ("UPDATED", age),
}

DOWNLOAD_COLUMNS: dict[str, Column] = {
    "id": ("ID", str),
    "model": ("MODEL", str),
    "status": ("STATUS", str),
    "share": ("DONE", str),
    "bytes_total": ("SIZE", lambda v: size(v) if v else "-"),
    "bytes_per_second": ("RATE", lambda v: f"{size(v)}/s" if v else "-"),
    "eta_seconds": ("ETA", duration),
    "error": ("ERROR", cell),
}


def cmd_models(args: argparse.Namespace) -> int:
    if args.name:
        return run(args, lambda m: m.model_info(args.name))
    return run(args, lambda m: m.list_models(), columns=MODEL_COLUMNS)


def cmd_load(args: argparse.Namespace) -> int:
    line = ProgressLine()

    async def progress(state: str, elapsed: float, message: str) -> None:
        line.update(message, final=state == "ready")

    async def load(service: Service) -> Any:
        try:
            loaded = await service.load(args.name, progress)
        finally:
            line.end()  # a failed load's line too
        return loaded if args.json else table([loaded], PS_COLUMNS)

    return run(args, load, server=True)


def cmd_unload(args: argparse.Namespace) -> int:
    return run(args, lambda m: m.unload(args.name, force=args.force))


def cmd_search(args: argparse.Namespace) -> int:
    async def search(service: Service) -> Any:
        found = await service.search_models(args.query, args.author, args.limit)
        if args.json:
            return found
        for r in found:
            r["size"] = ("~" if r.get("size_is_estimate") else "") + size(r["size_bytes"])
        return table(found, SEARCH_COLUMNS)

    return run(args, search)


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a model with a progress line (in the running server when one is up)."""
    line = ProgressLine()

    async def progress(job: dict[str, Any]) -> None:
        line.update(download_text(job), final=job["status"] not in ("queued", "running"))

    async def pull(service: Service) -> Any:
        try:
            job = await service.download_model(args.name, progress)
        finally:
            line.end()
        if job["status"] != "done":
            raise ServiceError(f"Download of {args.name} {job['status']}: {job['error']}")
        files = job["files_total"]
        return (
            job
            if args.json
            else (
                f"Downloaded {job['model']}: {size(job['bytes_total'])} in {files} "
                f"file{'s' * (files != 1)}."
            )
        )

    return run(args, pull)


def cmd_downloads(args: argparse.Namespace) -> int:
    """Downloads of this server run (in progress, done, failed); `--cancel ID` stops one."""

    async def downloads(service: Service) -> Any:
        if args.cancel:
            return await service.cancel_download(args.cancel)
        jobs = await service.download_status()
        if args.json:
            return jobs
        for job in jobs:
            total = job["bytes_total"]
            job["share"] = f"{job['bytes_done'] / total:.0%}" if total else "-"
        return table(jobs, DOWNLOAD_COLUMNS)

    return run(args, downloads, server=True)


def cmd_rm(args: argparse.Namespace) -> int:
    return run(args, lambda m: m.delete_model(args.name, unload=args.unload))
