"""The code that runs inside one worker process (spawned, never forked, as `python -m
gateway.engine.worker`): it imports MLX, says it is warm, loads the model it is given, beats a
heartbeat and runs the Engine (gateway/engine/generator.py) until told to stop or the gateway
goes away. Protocol: gateway/engine/protocol.py."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from gateway.catalog.local import context_length_of, encoder_context, is_encoder, think_markers
from gateway.engine.generator import Engine
from gateway.engine.pipe import WorkerPipe
from gateway.engine.protocol import Heartbeat, Load, LoadFailed, Ready, Warm
from gateway.observe.logs import WORKER_LOG_BYTES, WorkerLogHandler, redirect_output

log = logging.getLogger("mlx_manager.worker")

HEARTBEAT_SECONDS = 1.0  # the gateway judges a worker hung by this beat's absence


def _log_to(options: dict[str, Any]) -> None:
    """From now on everything this process prints goes to its model's log file (a warm spare
    prints to the gateway's stderr until it is given a model), and a fatal fault (SIGSEGV,
    SIGABRT, ...) leaves the Python traceback of every thread there."""
    if not options.get("log_file"):
        return
    path = Path(options["log_file"])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        redirect_output(path)
    except OSError as e:  # an unwritable log folder must not stop the model from loading
        print(f"worker: cannot write {path} ({e}); logging to stderr", file=sys.stderr)
        return
    handler = WorkerLogHandler(path, int(options.get("log_max_bytes") or WORKER_LOG_BYTES))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    faulthandler.enable(file=sys.stderr, all_threads=True)


def _start_heartbeat(conn: WorkerPipe, interval: float) -> None:
    """Tell the gateway this process still runs, from a thread of its own: MLX releases the
    GIL while it computes, so the beat goes on through a long prefill or load, and stops only
    when the process cannot run at all (stopped, deadlocked, swapped out)."""

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                conn.send(Heartbeat())
            except OSError:
                return  # the gateway went away; the main thread finds out too

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def serve(conn: WorkerPipe, model_path: str, options: dict[str, Any]) -> None:
    """Load the model, say so, then generate until told to stop or the gateway goes away."""
    _log_to(options)
    _start_heartbeat(conn, float(options.get("heartbeat_seconds") or HEARTBEAT_SECONDS))
    log.info("loading %s (pid %d)", model_path, os.getpid())
    started = time.perf_counter()
    try:
        import mlx.core as mx

        if is_encoder(json.loads((Path(model_path) / "config.json").read_text())):
            from gateway.engine import encoder

            model, tokenizer, config = encoder.load(model_path)
            context = encoder_context(config)
        else:
            import mlx_lm

            model, tokenizer, config = mlx_lm.load(model_path, return_config=True)  # type: ignore[misc]
            context = context_length_of(config) or 4096
    except BaseException as e:  # noqa: BLE001 - any load failure is reported, not raised
        log.error("load failed: %s: %s\n%s", type(e).__name__, e, traceback.format_exc())
        try:
            conn.send(LoadFailed(f"{type(e).__name__}: {e}", traceback.format_exc()))
        finally:
            conn.close()
        return
    info = {
        "pid": os.getpid(),
        "load_seconds": time.perf_counter() - started,
        "memory_bytes": int(mx.get_active_memory() + mx.get_cache_memory()),
        "context_length": context,
    }
    log.info(
        "loaded in %.2fs: %.1f MiB, context %d tokens",
        info["load_seconds"],
        info["memory_bytes"] / 2**20,
        context,
    )
    conn.send(Ready(info))
    try:
        assert config is not None
        engine: Engine
        if is_encoder(config):
            from gateway.engine.encoder import EncoderEngine

            engine = EncoderEngine(model, tokenizer, conn, config)
        else:
            cfg: dict[str, Any] = config.get("text_config") or config
            engine = Engine(
                model,
                tokenizer,
                conn,
                context,
                int(options.get("batch_size", 32)),
                max(int(cfg.get("vocab_size") or 0), len(tokenizer)),
                int(options.get("prompt_cache_bytes", 0)),
                think_markers(Path(model_path)),
            )
        engine.run()
        log.info("stopping: asked by the gateway")
    except (EOFError, OSError, KeyboardInterrupt):
        log.info("stopping: the gateway went away")
    finally:
        mx.clear_streams()


def main(argv: list[str] | None = None) -> None:
    """`python -m gateway.engine.worker --fd N`: started by the gateway, never by hand.

    It imports MLX and mlx-lm first (over a second of a model's cold start), says "warm", then
    waits for ("load", path, options): the gateway keeps one such process ready in advance."""
    parser = argparse.ArgumentParser(prog="python -m gateway.engine.worker")
    parser.add_argument("--fd", type=int, required=True, help="socket inherited from the gateway")
    args = parser.parse_args(argv)
    conn = WorkerPipe(args.fd)
    try:
        import mlx.core  # noqa: F401
        import mlx_lm.generate  # noqa: F401

        conn.send(Warm(os.getpid()))
        msg = conn.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the gateway went away (or shut down) before this worker was needed
    if isinstance(msg, Load):
        serve(conn, msg.path, msg.options)


if __name__ == "__main__":
    main()
