"""Prometheus metrics at GET /metrics (prometheus-client, names prefixed `mlx_manager_`).

Two kinds: events are counted as they happen (requests, tokens, loads, evictions, crashes,
with latency histograms); state (queues, memory, worker throughput) is read from the pool when
Prometheus scrapes, so it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway.observe import logs
from gateway.observe.requestlog import RequestLog, RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# `*_created` series (a timestamp per labelled series) double the output and no dashboard
# reads them.
disable_created_metrics()
STATES = ("loading", "ready", "draining", "failed", "unloaded")
# Seconds: from a tiny model's first token on a laptop to a long answer of a large one.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RATE_BUCKETS = (1, 2.5, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # the gateway process itself: CPU, RSS, open files
        self.requests = Counter(
            "mlx_manager_requests",
            "Generation requests by model, endpoint and status (499: the client went away).",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "mlx_manager_request_duration_seconds",
            "Generation requests from arrival to their last byte.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mlx_manager_time_to_first_token_seconds",
            "From a request's arrival to its first generated token (queue and load included).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "mlx_manager_decode_tokens_per_second",
            "Each request's own decode speed: its tokens after the first, per second.",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mlx_manager_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "mlx_manager_cached_prompt_tokens",
            "Prompt tokens reused from the prompt cache (part of the prompt tokens).",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "mlx_manager_completion_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.loads = Counter(
            "mlx_manager_model_loads", "Models loaded into a worker.", ["model"], registry=r
        )
        self.load_failures = Counter(
            "mlx_manager_model_load_failures", "Loads that failed.", ["model"], registry=r
        )
        self.load_duration = Histogram(
            "mlx_manager_model_load_duration_seconds",
            "From a load's start (room made) until its worker is ready.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "mlx_manager_model_evictions",
            "Models unloaded to make room for another (memory budget or loaded-model limit).",
            ["model"],
            registry=r,
        )
        self.idle_unloads = Counter(
            "mlx_manager_model_idle_unloads",
            "Models unloaded after their idle TTL.",
            ["model"],
            registry=r,
        )
        self.crashes = Counter(
            "mlx_manager_worker_crashes",
            "Worker processes that died on their own (killed, out of memory, a fault).",
            ["model"],
            registry=r,
        )
        self.stalls = Counter(
            "mlx_manager_worker_stalls",
            "Workers killed because they stopped answering (no heartbeat within "
            "MLX_MANAGER_WORKER_STALL_TIMEOUT: stopped, deadlocked).",
            ["model"],
            registry=r,
        )

        self._series: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    def watch(self, status: Callable[[], dict[str, Any]]) -> None:
        """Read the pool's state at each scrape, from `status` (ModelPool.snapshot)."""
        self.registry.register(PoolCollector(status))

    def watch_dropped(self, request_log: RequestLog) -> None:
        """Count, at each scrape, what the request log and the log file could not keep."""
        self.registry.register(DroppedCollector(request_log))

    def request(self, record: RequestRecord) -> None:
        """Count one finished generation request."""
        model = record.label_model
        key = (model, record.endpoint, str(record.status))
        series = self._series.get(key)
        if series is None:  # labels() costs ~3 µs a call: look each series up once
            per_model = (self.ttft, self.decode_rate, self.prompt_tokens, self.cached_tokens)
            series = self._series[key] = (
                self.requests.labels(*key),
                self.duration.labels(model, record.endpoint),
                # Per-model series only for resolved models (no empty-model histograms).
                *(m.labels(model) if model else None for m in per_model),
                self.completion_tokens.labels(model) if model else None,
            )
        requests, duration, ttft, rate, prompt, cached, completion = series
        requests.inc()
        if record.duration is not None:
            duration.observe(record.duration)
        if not model:
            return
        if (first := record.ttft) is not None:
            ttft.observe(first)
        if (speed := record.decode_rate) is not None:
            rate.observe(speed)
        if record.prompt_tokens:
            prompt.inc(record.prompt_tokens)
        if record.cached_tokens:
            cached.inc(record.cached_tokens)
        if record.completion_tokens:
            completion.inc(record.completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class DroppedCollector(Collector):
    """Rows and log lines that never reached the disk: a full disk loses them, and these
    counters are how anyone learns of it (the log file itself cannot say so until later)."""

    def __init__(self, request_log: RequestLog) -> None:
        self.request_log = request_log

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "mlx_manager_request_log_rows_dropped",
            "Request log rows never written (a full disk, or a database far behind).",
            value=self.request_log.dropped_total,
        )
        yield CounterMetricFamily(
            "mlx_manager_log_lines_dropped",
            "Server log file lines never written (a full disk).",
            value=logs.dropped_lines(),
        )


class PoolCollector(Collector):
    """Gauges of the pool's state, read when Prometheus scrapes: from its public status
    (`PoolStatus`: every model's status row, the budget and what is used of it)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("model",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"mlx_manager_{name}", doc, labels=list(labels))

        state = gauge("model_state", "1 for each model's current state.", ("model", "state"))
        in_flight = gauge("model_requests_in_flight", "Requests a model is running now.")
        queue = gauge(
            "model_queue_depth",
            "Requests waiting for a model: for its load, or beyond its batch width.",
        )
        memory = gauge("model_memory_bytes", "Memory a model counts against the budget.")
        rss = gauge("worker_resident_memory_bytes", "Resident memory of a model's worker process.")
        rate = gauge("model_tokens_per_second", "A model's decode throughput over its last report.")
        silent = gauge(
            "worker_silent_seconds",
            "Seconds since a model's worker last spoke (it beats every second while it runs).",
        )
        loaded = 0
        for row in status["models"]:
            model = row["model"]
            for s in STATES:
                state.add_metric([model, s], float(row["state"] == s))
            if row["state"] == "unloaded" and not row["queued"]:
                continue
            loaded += row["state"] == "ready"
            in_flight.add_metric([model], row["in_flight"])
            queue.add_metric([model], row["queued"])
            memory.add_metric([model], row["memory_bytes"])
            rate.add_metric([model], row["tokens_per_second"])
            if row["silent_seconds"] is not None:
                silent.add_metric([model], row["silent_seconds"])
            if row["pid"] is not None:
                try:
                    rss.add_metric([model], psutil.Process(row["pid"]).memory_info().rss)
                except psutil.Error:
                    pass  # it exited between the two looks
        yield from (state, in_flight, queue, memory, rss, rate, silent)
        yield GaugeMetricFamily(
            "mlx_manager_models_loaded", "Models loaded and ready.", value=loaded
        )
        yield GaugeMetricFamily(
            "mlx_manager_memory_budget_bytes",
            "The memory budget (MLX_MANAGER_MEMORY_BUDGET).",
            value=status["memory_budget_bytes"],
        )
        yield GaugeMetricFamily(
            "mlx_manager_memory_used_bytes",
            "Memory the loaded models count against the budget.",
            value=status["memory_used_bytes"],
        )
