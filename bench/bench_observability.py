"""What observability costs (not a test). Measured in one run, on a ~1M-parameter random model
where a request's own cost is smallest, so any overhead shows:

- short requests (max_tokens=1, non-streamed, then streamed 32 tokens) through two servers:
  one with everything on (a log line and a request log row per request, metrics), one with
  the request log off and log lines below its level (metrics stay: they cannot be turned off);
  the ratio of their median latencies and stream rates;
- in-process: the cost of finishing one request record (log line + metrics + request log
  queue), and how fast the writer thread puts rows into sqlite;
- how long a /metrics scrape takes with models loaded.

    .venv/bin/python bench/bench_observability.py [--requests 300]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from config.settings import load_settings  # noqa: E402
from gateway.model_builder import EOS_TOKEN_ID, ModelSpec, build_model  # noqa: E402
from tests.server import start_server  # noqa: E402

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def latencies(url: str, n: int, **extra: object) -> list[float]:
    """Seconds per request, one after another on one connection, after a warm-up."""
    out = []
    with httpx.Client(timeout=60) as http:
        for i in range(n + 10):
            start = time.perf_counter()
            r = http.post(url + "/v1/chat/completions", json={**BODY, **extra})
            if r.status_code != 200:
                raise SystemExit(f"request failed: {r.status_code} {r.text}")
            if i >= 10:
                out.append(time.perf_counter() - start)
    return out


def stream_rate(url: str, n: int, tokens: int) -> float:
    """Median chunks per second of streamed answers (EOS banned: each runs to `tokens`)."""
    rates = []
    body = {**BODY, "max_tokens": tokens, "stream": True, "logit_bias": {str(EOS_TOKEN_ID): -100}}
    with httpx.Client(timeout=60) as http:
        for _ in range(n):
            with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                stamps = [time.perf_counter() for line in r.iter_lines() if line.startswith("data")]
            rates.append((len(stamps) - 2) / (stamps[-2] - stamps[0]))
    return statistics.median(rates)


def in_process(root: Path, n: int) -> tuple[float, float]:
    """(µs to finish one record, rows/s the writer stores)."""
    from gateway.manager import Manager
    from gateway.requestlog import RequestRecord

    home = root / "inproc"
    settings = load_settings(
        environ={"MLX_MANAGER_HOME": str(home), "MLX_MANAGER_MODEL_DIRS": str(root / "models")}
    )
    logging.basicConfig(level="INFO", handlers=[logging.FileHandler(home / "bench.log")])
    manager = Manager(settings)
    records = []
    for _ in range(n):
        r = RequestRecord("/v1/chat/completions", model="tiny", model_id="tiny")
        r.prompt_tokens, r.completion_tokens, r.cached_tokens = 20, 32, 10
        r.first_token = r.t0 + 0.01
        r.end(200, complete=True)
        records.append(r)
    start = time.perf_counter()
    for r in records:
        manager.finish_request(r)
    finish_us = (time.perf_counter() - start) / n * 1e6
    manager.request_log.flush(timeout=60)
    rows_per_s = n / (time.perf_counter() - start)
    manager.request_log.close()
    return finish_us, rows_per_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "models" / "tiny", ModelSpec())
        env = {"MLX_MANAGER_MODEL_DIRS": str(root / "models"), "MLX_MANAGER_WARM_SPARE": "0"}
        quiet = {"MLX_MANAGER_LOG_RETENTION": "0", "MLX_MANAGER_LOG_LEVEL": "warning"}
        results = {}
        for name, extra in (("full", {}), ("quiet", quiet)):
            server = start_server(root / name, {**env, **extra})
            try:
                short = latencies(server.url, args.requests, max_tokens=1)
                rate = stream_rate(server.url, args.streams, 32)
                scrape = []
                for _ in range(50):
                    start = time.perf_counter()
                    httpx.get(server.url + "/metrics")
                    scrape.append(time.perf_counter() - start)
                results[name] = (statistics.median(short), rate, statistics.median(scrape))
            finally:
                server.stop()
        finish_us, rows_per_s = in_process(root, 20_000)
    (full_lat, full_rate, scrape), (quiet_lat, quiet_rate, _) = results["full"], results["quiet"]
    print(f"{args.requests} requests of 1 token, median latency:")
    print(
        f"  everything on {full_lat * 1e3:.2f} ms, request log and lines off "
        f"{quiet_lat * 1e3:.2f} ms: ratio {full_lat / quiet_lat:.3f}"
    )
    print(
        f"streamed 32 tokens, median chunks/s: on {full_rate:.0f}, off {quiet_rate:.0f}: "
        f"ratio {full_rate / quiet_rate:.3f}"
    )
    print(
        f"finishing one request record in-process: {finish_us:.1f} µs "
        f"({finish_us / (quiet_lat * 1e6) * 100:.2f}% of a 1-token request)"
    )
    print(f"request log writer: {rows_per_s:,.0f} rows/s into sqlite")
    print(f"/metrics scrape, 1 model loaded: {scrape * 1e3:.2f} ms median")


if __name__ == "__main__":
    main()
