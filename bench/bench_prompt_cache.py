"""Prompt cache benchmark (not a test): a 10-turn chat whose history grows each turn, through
the gateway with the prompt cache and without it (MLX_MANAGER_PROMPT_CACHE_BYTES=0), on a ~16M
model it builds. Prints time to first token per turn, the cached tokens reported in `usage`,
and the ratio without/with.

    .venv/bin/python bench/bench_prompt_cache.py [--turns 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.catalog.builder import _WORDS, BENCH_SPEC, build_model  # noqa: E402
from tests.server import start_server  # noqa: E402


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def chat(url: str, turns: int, seed: int) -> list[tuple[float, int, int]]:
    """(time to first token, prompt tokens, cached tokens) per turn."""
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [{"role": "system", "content": words(rng, 300)}]
    out = []
    for _ in range(turns):
        messages.append({"role": "user", "content": words(rng, 60)})
        started = time.perf_counter()
        first = None
        text = ""
        usage = None
        for chunk in client.chat.completions.create(
            model="bench",
            messages=messages,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - started
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        out.append((first or 0.0, usage.prompt_tokens, cached or 0))
        messages.append({"role": "assistant", "content": text})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "models" / "bench", BENCH_SPEC)
        results: dict[str, list[list[tuple[float, int, int]]]] = {}
        for label, size in (("cache", "512MiB"), ("no cache", "0")):
            env = {
                "MLX_MANAGER_MODEL_DIRS": str(root / "models"),
                "HF_HUB_CACHE": str(root / "hf"),
                "MLX_MANAGER_PROMPT_CACHE_BYTES": size,
                "MLX_MANAGER_WARM_SPARE": "0",
            }
            server = start_server(root / f"home-{size}", env)
            try:
                chat(server.v1, 2, seed=999)  # load the model and warm up
                results[label] = [chat(server.v1, args.turns, seed=r) for r in range(args.rounds)]
            finally:
                server.stop()

    print(f"{args.turns}-turn chat, ~16M model, median of {args.rounds} rounds")
    print("turn  prompt tokens  cached  TTFT cache  TTFT no cache  ratio")
    ratios = []
    for t in range(args.turns):
        with_cache = statistics.median(r[t][0] for r in results["cache"])
        without = statistics.median(r[t][0] for r in results["no cache"])
        prompt = results["cache"][0][t][1]
        cached = results["cache"][0][t][2]
        ratio = without / with_cache if with_cache else float("nan")
        ratios.append(ratio)
        print(
            f"{t + 1:4d}  {prompt:13d}  {cached:6d}  {with_cache * 1000:8.1f} ms"
            f"  {without * 1000:10.1f} ms  {ratio:5.2f}x"
        )
    print(
        f"turns 2-{args.turns}: TTFT without / with cache, "
        f"median {statistics.median(ratios[1:]):.2f}x"
    )


if __name__ == "__main__":
    main()
