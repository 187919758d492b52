"""Gateway overhead benchmark (not a test). For two random models it builds (a ~1M-parameter
tiny one, where per-token overhead is most visible, and a ~16M one), measured in one run:

- decode tokens/s and time to first token, in-process (mlx_lm.stream_generate) vs through the
  gateway (openai SDK, streaming);
- aggregate tokens/s at 1, 4 and 8 concurrent streams through the gateway, against mlx-lm's
  BatchGenerator in-process at the same concurrency.

    .venv/bin/python bench/bench_gateway.py [--tokens 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.catalog.builder import BENCH_SPEC, ModelSpec, build_model  # noqa: E402
from tests.server import Server, start_server  # noqa: E402

SPECS = {"tiny-1m": ModelSpec(), "bench-20m": BENCH_SPEC}
MESSAGES = [{"role": "user", "content": "tell me about the quick brown fox and the lazy dog"}]
CONCURRENCY = (1, 4, 8)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"stream {i} of the quick brown fox"}]


def in_process(path: Path, tokens: int, rounds: int) -> tuple[float, float, dict[int, float]]:
    """(decode tok/s, TTFT s) of stream_generate, best of `rounds` after a warm-up, and the
    aggregate tok/s of BatchGenerator per concurrency."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    model, tok = mlx_lm.load(str(path))
    rates, ttfts = [], []
    for _ in range(rounds + 1):
        # Timed like a server sees it: from the messages (chat template included) to the first
        # token that shows text (random weights often start with tokens that decode to nothing).
        start = time.perf_counter()
        prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
        first = last = 0.0
        n = 0
        for r in mlx_lm.stream_generate(
            model, tok, prompt, max_tokens=tokens, sampler=make_sampler(0.0)
        ):
            last = time.perf_counter()
            if r.text and not first:
                first = last
            n += 1
        rates.append((n - 1) / (last - first))
        ttfts.append(first - start)
    batch: dict[int, float] = {}
    for n in CONCURRENCY:
        gen = BatchGenerator(
            model,
            completion_batch_size=32,
            prefill_batch_size=8,
            stream=mx.new_stream(mx.default_device()),
        )
        gen.insert(
            [tok.apply_chat_template(messages(i), add_generation_prompt=True) for i in range(n)],
            max_tokens=[tokens] * n,
        )
        start, count, active = time.perf_counter(), 0, n
        while active:
            for r in gen.next()[1]:
                count += 1
                active -= r.finish_reason is not None
        batch[n] = count / (time.perf_counter() - start)
        gen.close()
    return max(rates[1:]), min(ttfts[1:]), batch


def settle(server: Server, model: str) -> None:
    """Load the model, then wait until the warm spare that replaces the one it took has
    finished its imports (about 1.5 s of CPU), so that steady state is what gets measured."""
    import httpx

    httpx.post(server.url + "/admin/load", json={"model": model}, timeout=600)

    def warm() -> bool:
        spare = httpx.get(server.url + "/admin/workers").json()["spare"]
        return bool(spare and spare["warm"])

    server.wait_for(warm, timeout=120, what="a warm spare")


def gateway_single(client: Any, model: str, tokens: int, rounds: int) -> tuple[float, float]:
    rates, ttfts = [], []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        first = last = 0.0
        usage = None
        stream = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            elif chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
        # Chunks are not tokens (a token may decode to no text yet): count tokens from usage.
        rates.append((usage.completion_tokens - 1) / (last - first))
        ttfts.append(first - start)
    return max(rates[1:]), min(ttfts[1:])


def gateway_raw_ttft(base_url: str, model: str, rounds: int) -> float:
    """Time to the first text chunk with a bare HTTP client: the gateway's own cost, without
    the openai SDK's per-request work on the client side."""
    import httpx

    body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    best = float("inf")
    with httpx.Client(timeout=600) as client:
        for _ in range(rounds + 2):
            start = time.perf_counter()
            with client.stream("POST", base_url + "/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if (
                        line.startswith("data: {")
                        and '"content": "' in line
                        and '"content": ""' not in line
                    ):
                        best = min(best, time.perf_counter() - start)
                        break
    return best


async def gateway_aggregate(base_url: str, model: str, tokens: int, streams: int) -> float:
    import openai

    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="x", max_retries=0, timeout=600
    ) as client:

        async def one(i: int) -> int:
            usage = None
            stream = await client.chat.completions.create(
                model=model,
                messages=messages(i),
                max_tokens=tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                usage = chunk.usage or usage
            return usage.completion_tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "mlx-bench")
    args = ap.parse_args()

    for name, spec in SPECS.items():
        if not (args.models / name / "model.safetensors").exists():
            print(f"building {name} in {args.models} ...", flush=True)
            build_model(args.models / name, spec)

    baseline = {name: in_process(args.models / name, args.tokens, args.rounds) for name in SPECS}

    import openai

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        server = start_server(
            Path(home) / "home",
            {
                "MLX_MANAGER_MODEL_DIRS": str(args.models),
                "HF_HUB_CACHE": str(Path(home) / "hf"),
                # The rounds repeat one prompt: with the prompt cache the gateway would skip the
                # prefill that the in-process baseline does (bench_prompt_cache.py measures that).
                "MLX_MANAGER_PROMPT_CACHE_BYTES": "0",
            },
        )
        try:
            client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=600)
            for name in SPECS:
                settle(server, name)
                single = gateway_single(client, name, args.tokens, args.rounds)
                raw_ttft = gateway_raw_ttft(server.v1, name, args.rounds)
                agg = {
                    n: asyncio.run(gateway_aggregate(server.v1, name, args.tokens, n))
                    for n in CONCURRENCY
                }
                results[name] = (single, raw_ttft, agg)
        finally:
            server.stop()

    for name in SPECS:
        rate_a, ttft_a, batch = baseline[name]
        (rate_b, ttft_b), raw_ttft, agg = results[name]
        print(f"\n== {name} ({args.tokens} tokens, greedy)")
        print(
            f"decode  in-process {rate_a:8.1f} tok/s   gateway {rate_b:8.1f} tok/s   "
            f"ratio {rate_b / rate_a:.3f}  (target >= 0.95)"
        )
        print(
            f"TTFT    in-process {ttft_a * 1e3:6.1f} ms     gateway {ttft_b * 1e3:6.1f} ms     "
            f"overhead {(ttft_b - ttft_a) * 1e3:+.1f} ms  (target <= 10 ms)"
        )
        print(
            f"TTFT    gateway with a bare HTTP client {raw_ttft * 1e3:6.1f} ms     "
            f"overhead {(raw_ttft - ttft_a) * 1e3:+.1f} ms"
        )
        for n in CONCURRENCY:
            print(
                f"{n} stream(s): in-process batch {batch[n]:8.1f} tok/s   gateway "
                f"{agg[n]:8.1f} tok/s   ratio {agg[n] / batch[n]:.3f}"
            )
        print(
            f"gateway aggregate 8 streams / 1 stream: {agg[8] / agg[1]:.2f}x (target >= 3x); "
            f"in-process: {batch[8] / batch[1]:.2f}x"
        )


if __name__ == "__main__":
    main()
