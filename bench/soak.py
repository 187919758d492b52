"""Soak and chaos run (not a test), on the loopback interface only: 3 tiny models with room for 2,
8 clients mixing streamed, non-streamed and abandoned requests for a bounded time and count,
some of them large (300 KB-1 MB prompts or stop strings) and some naming their model by a
variant of its absolute path (`..`, `//`, `.`), while a loaded worker is SIGKILLed, or
SIGSTOPped and SIGCONTed a while later (longer than the stall timeout: the gateway must kill it
itself), at random intervals.

It reports requests sent, succeeded, failed with a clean error (an OpenAI error body: 503 for
a killed worker, 429 for a full queue), hung (no answer within --hang seconds: must be 0),
server errors other than 503 (must be 0), connection errors, and the gateway's RSS over time
with its trend after warm-up, and what the request log and /metrics counted. Exit status 1
when a must-be-zero count is not zero or the request log and metrics disagree.

    .venv/bin/python bench/soak.py [--minutes 10] [--max-requests 100000] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.catalog.builder import ModelSpec, build_model  # noqa: E402
from tests.server import Server, start_server  # noqa: E402

MODELS = ["soak-a", "soak-b", "soak-c"]


STALL_TIMEOUT = 5.0  # the server's MLX_MANAGER_WORKER_STALL_TIMEOUT in this run


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # normal / large / path-named requests
    bad: list[str] = field(default_factory=list)  # details of hung / 5xx / malformed
    kills: int = 0
    stops: int = 0  # SIGSTOPs; each is followed by a SIGCONT
    max_workers: int = 0  # live worker processes chaos saw at once (path variants must share)
    states: Counter[str] = field(default_factory=Counter)  # worker states chaos saw
    rss: list[tuple[float, int]] = field(default_factory=list)

    def record(self, outcome: str, status: int | None = None, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if status is not None:
            self.statuses[status] += 1
        if outcome in ("hung", "server_error", "malformed") and len(self.bad) < 20:
            self.bad.append(f"{outcome} {status}: {detail[:300]}")


def _clean_error(status: int, body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("message"), str) and bool(error["message"])


def model_name(rng: random.Random, folder: Path, model: str) -> tuple[str, str]:
    """The model's id, or (one request in ten) a variant of its folder's absolute path."""
    if rng.random() >= 0.1:
        return "normal", model
    variants = [
        f"{folder}/../{folder.name}/{model}",
        f"/{folder}/{model}",
        f"{folder}/./{model}",
        f"{folder}//{model}/",
    ]
    return "path", rng.choice(variants)


def large_body(rng: random.Random, body: dict[str, object]) -> dict[str, object]:
    """Far larger than a socket buffer: a 300 KB-1 MB prompt (refused for the context, after
    the worker has read it) or stop strings as large (served)."""
    size = rng.randint(300_000, 1_000_000)
    if rng.random() < 0.5:
        return {**body, "messages": [{"role": "user", "content": "soak " * (size // 5)}]}
    return {**body, "stop": [f"{i}" + "z" * (size // 4) for i in range(4)]}


async def one_request(
    http: httpx.AsyncClient, rng: random.Random, tally: Tally, hang: float, folder: Path
) -> None:
    kind, model = model_name(rng, folder, rng.choice(MODELS))
    mode = rng.choices(["stream", "plain", "abandon"], weights=[4, 4, 2])[0]
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
        "max_tokens": rng.randint(4, 96),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "stream": mode != "plain",
    }
    if rng.random() < 0.04:
        kind, body = "large", large_body(rng, body)
    tally.kinds[kind] += 1
    try:
        async with asyncio.timeout(hang):
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    content = await r.aread()
                    if r.status_code >= 500 and r.status_code != 503:
                        tally.record(
                            "server_error", r.status_code, content.decode(errors="replace")
                        )
                    elif _clean_error(r.status_code, content):
                        tally.record("clean_error", r.status_code)
                    else:
                        tally.record("malformed", r.status_code, content.decode(errors="replace"))
                    return
                if mode == "plain":
                    data = json.loads(await r.aread())
                    ok = data["choices"][0]["finish_reason"] in ("stop", "length")
                    tally.record("ok" if ok else "malformed", 200, json.dumps(data))
                    return
                lines, last = 0, ""
                leave_after = rng.randint(1, 4)
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        lines += 1
                        last = line
                        if mode == "abandon" and lines >= leave_after:
                            tally.record("abandoned", 200)
                            return  # leaving the block closes the connection mid-stream
                if last == "data: [DONE]":
                    tally.record("ok", 200)
                elif '"error"' in last:  # the worker was killed mid-stream: a clean last event
                    tally.record("clean_error", 200)
                else:
                    tally.record("malformed", 200, last)
    except TimeoutError:
        tally.record("hung", None, json.dumps(body))
    except httpx.HTTPError as e:
        tally.record("connection_error", None, repr(e))


async def client(
    url: str,
    rng: random.Random,
    tally: Tally,
    stop: float,
    budget: list[int],
    hang: float,
    folder: Path,
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        while time.monotonic() < stop and budget[0] > 0:
            budget[0] -= 1
            await one_request(http, rng, tally, hang, folder)


async def chaos(
    server: Server, rng: random.Random, tally: Tally, stop: float, every: tuple[float, float]
) -> None:
    """SIGKILL a random live worker every few seconds, or (one time in three) SIGSTOP it and
    SIGCONT it after 1-10 s: past the stall timeout the gateway has killed it by then."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        while time.monotonic() < stop:
            await asyncio.sleep(rng.uniform(*every))
            try:
                workers = (await http.get("/admin/workers")).json()["data"]
            except httpx.HTTPError as e:
                tally.record("connection_error", None, f"GET /admin/workers: {e!r}")
                continue
            # Any live worker: one that is generating, loading or draining.
            pids = [w["pid"] for w in workers if w["pid"]]
            tally.states.update(w["state"] for w in workers)
            tally.max_workers = max(tally.max_workers, len(pids))
            if pids:
                pid = rng.choice(pids)
                try:
                    if rng.random() < 1 / 3:
                        os.kill(pid, signal.SIGSTOP)
                        tally.stops += 1
                        asyncio.get_running_loop().call_later(
                            rng.uniform(1, 2 * STALL_TIMEOUT), _resume, pid
                        )
                    else:
                        os.kill(pid, signal.SIGKILL)
                        tally.kills += 1
                except ProcessLookupError:
                    pass


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # the gateway killed it for not answering


async def sample_rss(pid: int, tally: Tally, stop: float, started: float) -> None:
    process = psutil.Process(pid)
    while time.monotonic() < stop:
        tally.rss.append((time.monotonic() - started, process.memory_info().rss))
        await asyncio.sleep(5)
    tally.rss.append((time.monotonic() - started, process.memory_info().rss))


def slope_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time (MiB per minute)."""
    if len(points) < 3:
        return 0.0
    xs = [t / 60 for t, _ in points]
    ys = [r / 2**20 for _, r in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


async def soak(server: Server, args: argparse.Namespace, folder: Path) -> Tally:
    rng = random.Random(args.seed)
    tally = Tally()
    started = time.monotonic()
    stop = started + args.minutes * 60
    budget = [args.max_requests]
    tasks = [
        client(server.url, random.Random(rng.random()), tally, stop, budget, args.hang, folder)
        for _ in range(args.clients)
    ]
    tasks.append(
        chaos(server, random.Random(rng.random()), tally, stop, (args.kill_min, args.kill_max))
    )
    tasks.append(sample_rss(server.proc.pid, tally, stop, started))
    await asyncio.gather(*tasks)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--hang", type=float, default=120, help="seconds before a request counts as hung"
    )
    parser.add_argument("--kill-min", type=float, default=3)
    parser.add_argument("--kill-max", type=float, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, name in enumerate(MODELS):
            build_model(root / "models" / name, ModelSpec(seed=i))
        env = {
            "MLX_MANAGER_MODEL_DIRS": str(root / "models"),
            "HF_HUB_CACHE": str(root / "hf"),
            "MLX_MANAGER_MAX_LOADED_MODELS": "2",
            "MLX_MANAGER_WORKER_STALL_TIMEOUT": str(STALL_TIMEOUT),
        }
        server = start_server(root / "home", env)  # binds 127.0.0.1 only
        try:
            tally = asyncio.run(soak(server, args, root / "models"))
            health = httpx.get(server.url + "/health", timeout=30).status_code
            workers = httpx.get(server.url + "/admin/workers", timeout=30).json()["data"]
            logged = records(server)
        finally:
            kept = Path(tempfile.gettempdir()) / "mlx-manager-soak-server.log"
            kept.write_bytes(server.log.read_bytes())
            print(f"server log: {kept}", file=sys.stderr)
            server.stop()  # fails if a worker process outlives the server

    o = tally.outcomes
    sent = sum(o.values())
    warm = [p for p in tally.rss if p[0] >= 60] or tally.rss
    rss_start, rss_end = tally.rss[0][1], tally.rss[-1][1]
    loaded = [w["model"] for w in workers if w["state"] in ("loading", "ready", "draining")]
    report = {
        "minutes": args.minutes,
        "clients": args.clients,
        "sent": sent,
        "succeeded": o["ok"],
        "abandoned_on_purpose": o["abandoned"],
        "failed_cleanly": o["clean_error"],
        "hung": o["hung"],
        "server_errors_other_than_503": o["server_error"],
        "malformed": o["malformed"],
        "connection_errors": o["connection_error"],
        "statuses": dict(sorted(tally.statuses.items())),
        "requests_by_kind": dict(tally.kinds),
        "workers_killed": tally.kills,
        "workers_stopped_and_continued": tally.stops,
        "most_worker_processes_at_once": tally.max_workers,
        "worker_slots_after": len(workers),
        "worker_states_seen_by_chaos": dict(tally.states),
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_max_mib": round(max(r for _, r in tally.rss) / 2**20, 1),
        "rss_trend_after_first_minute_mib_per_min": round(slope_mib_per_min(warm), 3),
        "health_after": health,
        "loaded_after": loaded,
        **logged,
    }
    print(json.dumps(report, indent=2))
    for line in tally.bad:
        print("  ", line)
    must_be_zero = o["hung"] + o["server_error"] + o["malformed"] + o["connection_error"]
    # Every request that reached the server has its row and its count, and the two agree.
    unrecorded = sent - logged["request_log_rows"]
    consistent = logged["request_log_rows"] == logged["metrics_requests_total"]
    # Path variants share their model's worker: never more slots than models.
    one_per_model = len(workers) <= len(MODELS) and logged["metric_model_labels"] <= len(MODELS)
    if must_be_zero or health != 200 or len(loaded) > 2 or not consistent or not one_per_model:
        return 1
    return 1 if unrecorded > o["abandoned"] else 0


def records(server: Server) -> dict[str, int]:
    """What the request log and /metrics say was served, to hold against what was sent."""
    from prometheus_client.parser import text_string_to_metric_families

    usage = httpx.get(server.url + "/admin/usage", params={"by": "total"}, timeout=30).json()
    families = text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=30).text)
    samples = [s for f in families for s in f.samples]
    counted = sum(s.value for s in samples if s.name == "mlx_manager_requests_total")
    labels = {s.labels["model"] for s in samples if s.labels.get("model")}
    return {
        "metric_model_labels": len(labels),
        "request_log_rows": usage["total"]["requests"],
        "request_log_cancelled": usage["total"]["cancelled"],
        "metrics_requests_total": int(counted),
    }


if __name__ == "__main__":
    sys.exit(main())
