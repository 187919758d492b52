"""Model swap benchmark (not a test), on ~16M-parameter random models it builds:

- cold load: POST /admin/load through the gateway (a warm spare worker takes the model) against
  mlx_lm.load in-process as the first load of a fresh process (imports excluded; also shown: a
  repeated load in one process), and the first request's time to first token on an unloaded
  model;
- round robin over 3 models with a budget of 2 loaded models: every request evicts one, one
  client at a time and three at once; p50/p95 latency and failures.

    .venv/bin/python bench/bench_swap.py [--rounds 5] [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.catalog.builder import BENCH_SPEC, build_model  # noqa: E402
from tests.server import Server, start_server  # noqa: E402

MODELS = ["swap-a", "swap-b", "swap-c"]
BODY = {
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 16,
    "temperature": 0,
}


def in_process_load(path: Path, rounds: int) -> tuple[float, float]:
    """Median mlx_lm.load time (a) as the first load of a fresh process, after its imports:
    what a cold model costs anyone who loads it in-process; (b) loading again in the same
    process, where MLX's allocator is already warm."""
    code = (
        "import time, mlx_lm, mlx_lm.generate; t = time.perf_counter(); "
        f"mlx_lm.load({str(path)!r}); print(time.perf_counter() - t)"
    )
    first = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(rounds)
    ]
    import mlx.core as mx
    import mlx_lm

    again = []
    for _ in range(rounds):
        start = time.perf_counter()
        model, tok = mlx_lm.load(str(path))
        again.append(time.perf_counter() - start)
        del model, tok
        mx.clear_cache()
    return statistics.median(first), statistics.median(again)


def wait_warm(server: Server, client: httpx.Client) -> None:
    def warm() -> bool:
        spare = client.get(server.url + "/admin/workers").json()["spare"]
        return bool(spare and spare["warm"])

    server.wait_for(warm, timeout=60, what="a warm spare")


def gateway_loads(server: Server, rounds: int) -> tuple[float, float]:
    """Median of admin load time, and of the first request's TTFT on an unloaded model."""
    loads, ttfts = [], []
    with httpx.Client(timeout=600) as client:
        for _ in range(rounds):
            wait_warm(server, client)
            start = time.perf_counter()
            r = client.post(server.url + "/admin/load", json={"model": MODELS[0]})
            loads.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
            client.post(server.url + "/admin/unload", json={"model": MODELS[0]})
            wait_warm(server, client)
            start = time.perf_counter()
            with client.stream(
                "POST",
                server.v1 + "/chat/completions",
                json={**BODY, "model": MODELS[0], "stream": True},
            ) as s:
                for line in s.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        ttfts.append(time.perf_counter() - start)
                        break
            client.post(server.url + "/admin/unload", json={"model": MODELS[0]})
    return statistics.median(loads), statistics.median(ttfts)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def round_robin(server: Server, requests: int, clients: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = 0
    async with httpx.AsyncClient(timeout=600) as client:

        async def one_client(c: int) -> None:
            nonlocal failures
            for i in range(requests // clients):
                model = MODELS[(i + c) % len(MODELS)]
                start = time.perf_counter()
                r = await client.post(
                    server.v1 + "/chat/completions", json={**BODY, "model": model}
                )
                latencies.append(time.perf_counter() - start)
                failures += r.status_code != 200

        await asyncio.gather(*(one_client(c) for c in range(clients)))
    return latencies, failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "mlx-swap")
    args = ap.parse_args()
    for seed, name in enumerate(MODELS):
        if not (args.models / name / "model.safetensors").exists():
            print(f"building {name} ...", flush=True)
            build_model(args.models / name, replace(BENCH_SPEC, seed=seed))

    baseline, warm_baseline = in_process_load(args.models / MODELS[0], args.rounds)
    with tempfile.TemporaryDirectory() as home:
        server = start_server(
            Path(home) / "home",
            {
                "MLX_MANAGER_MODEL_DIRS": str(args.models),
                "HF_HUB_CACHE": str(Path(home) / "hf"),
                "MLX_MANAGER_MAX_LOADED_MODELS": "2",
            },
        )
        try:
            load, ttft = gateway_loads(server, args.rounds)
            rr = {n: asyncio.run(round_robin(server, args.requests, n)) for n in (1, 3)}
        finally:
            server.stop()

    print(
        f"\ncold load  mlx_lm.load, first in a fresh process {baseline * 1e3:7.1f} ms   "
        f"gateway /admin/load {load * 1e3:7.1f} ms   ratio {load / baseline:.2f} (target <= 1.2)"
    )
    print(
        f"           (mlx_lm.load again in the same process: {warm_baseline * 1e3:.1f} ms, "
        f"ratio {load / warm_baseline:.2f})"
    )
    print(f"first request on an unloaded model: time to first token {ttft * 1e3:.1f} ms")
    for n, (lat, failures) in rr.items():
        print(
            f"round robin, 3 models, 2 loaded, {n} client(s): {len(lat)} requests, "
            f"p50 {percentile(lat, 50) * 1e3:.0f} ms, p95 {percentile(lat, 95) * 1e3:.0f} ms, "
            f"failures {failures}"
        )


if __name__ == "__main__":
    main()
