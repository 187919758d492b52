"""The commands that start a server, and so the composition root: `serve` builds the HTTP and
MCP faces over one service; `mcp` serves the MCP tools over stdio."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from config.settings import Settings, load_settings
from gateway.catalog.local import scan_local_models
from gateway.cli.run import settings as client_settings
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

    from gateway.console import routes as console
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
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"mlx-manager serving on {base}/v1 ({auth}); console at {base}/; "
        f"Anthropic API at {base}/v1/messages, Responses at {base}/v1/responses",
        file=sys.stderr,
    )
    try:
        uvicorn.run(
            create_app(
                settings,
                service,
                build_mcp(service),
                pages=console.ROUTES,
                open_paths=console.OPEN_PATHS,
                open_prefixes=console.OPEN_PREFIXES,
            ),
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


def cmd_mcp(args: argparse.Namespace) -> int:
    """MCP over stdio: the same tools as /mcp, on the running server's workers if one is up."""
    from mcp_tools.server import build_mcp

    settings = client_settings(args)
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
