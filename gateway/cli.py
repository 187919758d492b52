"""The `mlx-manager` command."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys

from config.settings import Settings, SettingsError, load_settings
from gateway.hub import scan_local_models

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
        }
    )
    setup_logging(settings)
    if not args.no_demo:
        ensure_demo_model(settings)
    print(f"mlx-manager serving on http://{settings.host}:{settings.port}/v1", file=sys.stderr)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0


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
        help="a folder of model folders (repeatable; adds to none of the env)",
    )
    serve.add_argument(
        "--no-demo",
        action="store_true",
        help="do not build the offline demo model when no model is found",
    )
    serve.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"mlx-manager: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
