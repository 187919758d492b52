"""Embedding throughput benchmark (not a test): inputs/s and tokens/s at batch sizes 1, 8 and 64,
through the gateway (openai SDK, POST /v1/embeddings, base64 as the SDK asks) against the same
model called in-process (gateway/engine/embedder.py and encoder.py, the code the worker runs),
in one run: the ~1M-parameter tiny language model and a small BERT encoder (4 layers of 128;
needs the `encoders` extra), where the gateway's own cost shows most; with --large also the ~16M
language model and a BERT of MiniLM-L6's shape (6 layers of 384). Linux's mlx[cpu] wheel uses a
reference BLAS (~2.6 GFLOP/s here, flat in batch size), so the large ones take minutes.

    .venv/bin/python bench/bench_embeddings.py [--seconds 5] [--large]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.catalog.builder import BENCH_SPEC, ModelSpec, build_model  # noqa: E402
from tests.encoder_model import build_encoder  # noqa: E402
from tests.server import start_server  # noqa: E402

LANGUAGE = {"tiny-1m": ModelSpec(), "bench-20m": BENCH_SPEC}
# name -> (hidden size, layers)
ENCODERS = {"bert-small": (128, 4), "bert-minilm-shape": (384, 6)}
SMALL = ("tiny-1m", "bert-small")
BATCHES = (1, 8, 64)
WORDS = "the quick brown fox jumps over the lazy dog while a cat sleeps in the sun".split()


def texts(n: int, offset: int = 0) -> list[str]:
    """n distinct sentences of 8-24 words (about what a retrieval chunk's title or line is)."""
    return [
        " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + (i * 5) % 17))
        for i in range(offset, offset + n)
    ]


def rate(call: Callable[[list[str]], int], batch: int, seconds: float) -> tuple[float, float]:
    """(inputs/s, tokens/s) of calling `call` on batches of `batch` inputs for `seconds`,
    after one warm-up call."""
    call(texts(batch))
    start, inputs, tokens, round_ = time.perf_counter(), 0, 0, 0
    while time.perf_counter() - start < seconds or round_ < 1:
        tokens += call(texts(batch, round_ * batch))
        inputs += batch
        round_ += 1
    elapsed = time.perf_counter() - start
    return inputs / elapsed, tokens / elapsed


def in_process(path: Path, seconds: float) -> dict[int, tuple[float, float]]:
    from gateway.engine import embedder, encoder

    if path.name in ENCODERS:
        model, tok, _ = encoder.load(str(path))

        def call(inputs: list[str]) -> int:
            job = encoder.Job(model, tok, {"inputs": inputs, "pooling": "mean"}, 128)
            while not job.done:
                job.step()
            return sum(job.result()[2])

        return {b: rate(call, b, seconds) for b in BATCHES}

    import mlx_lm

    model, tok = mlx_lm.load(str(path))

    def call(inputs: list[str]) -> int:
        request = {"inputs": inputs, "pooling": "mean", "normalize": True}
        _, _, tokens = embedder.embed(model, tok, request, 4096, 1 << 30)
        return sum(tokens)

    return {b: rate(call, b, seconds) for b in BATCHES}


def through_gateway(client: Any, model: str, seconds: float) -> dict[int, tuple[float, float]]:
    def call(inputs: list[str]) -> int:
        return int(client.embeddings.create(model=model, input=inputs).usage.prompt_tokens)

    return {b: rate(call, b, seconds) for b in BATCHES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "mlx-bench")
    ap.add_argument("--large", action="store_true", help="also the ~20M-parameter models")
    args = ap.parse_args()
    names = (*LANGUAGE, *ENCODERS) if args.large else SMALL
    for name in names:
        if (args.models / name / "model.safetensors").exists():
            continue
        print(f"building {name} in {args.models} ...", flush=True)
        if name in LANGUAGE:
            build_model(args.models / name, LANGUAGE[name])
        else:
            hidden, layers = ENCODERS[name]
            build_encoder(args.models / name, "bert", "BertModel", 0, hidden=hidden, layers=layers)

    baseline = {name: in_process(args.models / name, args.seconds) for name in names}

    import httpx
    import openai

    results: dict[str, dict[int, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as home:
        env = {"MLX_MANAGER_MODEL_DIRS": str(args.models), "HF_HUB_CACHE": str(Path(home) / "hf")}
        server = start_server(Path(home) / "home", {**env, "MLX_MANAGER_WARM_SPARE": "0"})
        try:
            client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=600)
            for name in names:
                httpx.post(server.url + "/admin/load", json={"model": name}, timeout=600)
                results[name] = through_gateway(client, name, args.seconds)
        finally:
            server.stop()

    for name in names:
        print(f"\n== {name} (mean pooling, 8-24 word inputs)")
        for b in BATCHES:
            (ia, ta), (ig, tg) = baseline[name][b], results[name][b]
            print(
                f"batch {b:3d}: in-process {ia:8.1f} inputs/s {ta:9.0f} tok/s   "
                f"gateway {ig:8.1f} inputs/s {tg:9.0f} tok/s   ratio {ig / ia:.3f}"
            )


if __name__ == "__main__":
    main()
