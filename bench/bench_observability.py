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
import logging.handlers
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from config.settings import load_settings  # noqa: E402
from gateway.catalog.builder import EOS_TOKEN_ID, ModelSpec, build_model  # noqa: E402
from tests.server import start_server  # noqa: E402

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def latencies(http: httpx.Client, url: str, n: int) -> list[float]:
    """Seconds per 1-token request, one after another on one connection."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = http.post(url + "/v1/chat/completions", json={**BODY, "max_tokens": 1})
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.text}")
        out.append(time.perf_counter() - start)
    return out


def stream_rates(http: httpx.Client, url: str, n: int, tokens: int) -> list[float]:
    """Chunks per second of streamed answers (EOS banned: each runs to `tokens`)."""
    rates = []
    body = {**BODY, "max_tokens": tokens, "stream": True, "logit_bias": {str(EOS_TOKEN_ID): -100}}
    for _ in range(n):
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            stamps = [time.perf_counter() for line in r.iter_lines() if line.startswith("data")]
        rates.append((len(stamps) - 2) / (stamps[-2] - stamps[0]))
    return rates


def in_process(root: Path, n: int) -> tuple[float, float]:
    """(CPU µs to finish one record on the request's thread, rows/s the writer stores)."""
    from gateway.observe.logs import TextFormatter
    from gateway.observe.requestlog import RequestRecord
    from gateway.service.local import LocalBackend
    from gateway.service.service import Service

    home = root / "inproc"
    settings = load_settings(
        environ={"MLX_MANAGER_HOME": str(home), "MLX_MANAGER_MODEL_DIRS": str(root / "models")}
    )
    home.mkdir(parents=True)
    # As the server logs (gateway/observe/logs.py: a queue, a thread writing), minus the terminal.
    handler = logging.FileHandler(home / "bench.log")
    handler.setFormatter(TextFormatter())
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(lines, handler)
    listener.start()
    logging.basicConfig(level="INFO", handlers=[logging.handlers.QueueHandler(lines)])
    service = Service(settings)
    backend = service.backend
    assert isinstance(backend, LocalBackend)
    records = []
    for _ in range(n):
        r = RequestRecord("/v1/chat/completions", model="tiny", model_id="tiny")
        r.prompt_tokens, r.completion_tokens, r.cached_tokens = 20, 32, 10
        r.first_token = r.t0 + 0.01
        r.end(200, complete=True)
        records.append(r)
    # CPU time of this thread: what a request's own thread spends (the log line's formatting
    # and the database writes happen on other threads, and would only add GIL waits here).
    start, cpu = time.perf_counter(), time.thread_time()
    for r in records:
        service.finish_request(r)
    finish_us = (time.thread_time() - cpu) / n * 1e6
    backend.request_log.flush(timeout=60)
    rows_per_s = n / (time.perf_counter() - start)
    backend.request_log.close()
    listener.stop()
    return finish_us, rows_per_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    configs = {
        "on": {},
        "off": {"MLX_MANAGER_LOG_RETENTION": "0", "MLX_MANAGER_LOG_LEVEL": "warning"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "models" / "tiny", ModelSpec())
        env = {"MLX_MANAGER_MODEL_DIRS": str(root / "models"), "MLX_MANAGER_WARM_SPARE": "0"}
        servers = {name: start_server(root / name, {**env, **c}) for name, c in configs.items()}
        short: dict[str, list[float]] = {name: [] for name in configs}
        rates: dict[str, list[float]] = {name: [] for name in configs}
        scrape: list[float] = []
        try:
            with httpx.Client(timeout=60) as http:
                for server in servers.values():  # load, warm up
                    latencies(http, server.url, 20)
                # Rounds alternate between the two servers, so drift hits both alike.
                for _ in range(args.rounds):
                    for name, server in servers.items():
                        short[name] += latencies(http, server.url, args.requests // args.rounds)
                        rates[name] += stream_rates(
                            http, server.url, args.streams // args.rounds, 32
                        )
                for _ in range(50):
                    start = time.perf_counter()
                    http.get(servers["on"].url + "/metrics")
                    scrape.append(time.perf_counter() - start)
        finally:
            for server in servers.values():
                server.stop()
        finish_us, rows_per_s = in_process(root, 20_000)
    lat = {name: statistics.median(v) for name, v in short.items()}
    rate = {name: statistics.median(v) for name, v in rates.items()}
    print(f"{args.requests} requests of 1 token each, median latency, {args.rounds} rounds:")
    print(
        f"  everything on {lat['on'] * 1e3:.2f} ms, request log and lines off "
        f"{lat['off'] * 1e3:.2f} ms: ratio {lat['on'] / lat['off']:.3f}"
    )
    print(
        f"{args.streams} streams of 32 tokens, median chunks/s: on {rate['on']:.0f}, "
        f"off {rate['off']:.0f}: ratio {rate['on'] / rate['off']:.3f}"
    )
    print(
        f"finishing one request record in-process: {finish_us:.1f} µs of CPU on its thread "
        f"({finish_us / (lat['off'] * 1e6) * 100:.2f}% of a 1-token request)"
    )
    print(f"request log writer: {rows_per_s:,.0f} rows/s into sqlite")
    print(f"/metrics scrape, 1 model loaded: {statistics.median(scrape) * 1e3:.2f} ms median")


if __name__ == "__main__":
    main()
