"""The backend of a service that owns its workers: the pool, the downloads, the metrics and the
request log writer of this process (`mlx-manager serve`, or a client with no server to talk
to)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from config.settings import Settings
from config.store import Store
from gateway import errors
from gateway.catalog.hub import DownloadProgress, Downloads
from gateway.catalog.local import LocalModel, declared_pooling
from gateway.catalog.names import Catalog, Resolved
from gateway.engine.pool import ModelPool
from gateway.engine.request import (
    EmbeddingRequest,
    Embeddings,
    GenerateRequest,
    Pooling,
    Ranking,
    RerankRequest,
)
from gateway.engine.stream import Generation
from gateway.observe import logs
from gateway.observe.metrics import Metrics
from gateway.observe.requestlog import (
    CANCELLED,
    GENERATION_ENDPOINTS,
    RequestLog,
    RequestRecord,
    content_of,
)
from gateway.observe.usage import Usage
from gateway.service import limits

# Paths whose requests are logged at debug level only (probes and scrapes every few seconds).
QUIET_PATHS = frozenset({"/health", "/metrics"})
access_log = logging.getLogger(logs.ACCESS)


class LocalBackend:
    """The pool, the downloads, the metrics and the request log writer of this process."""

    def __init__(self, settings: Settings, store: Store, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.metrics_registry = Metrics()
        self.pool = ModelPool(settings, catalog, self.metrics_registry)
        self.request_log = RequestLog(settings, store)
        self.metrics_registry.watch_dropped(self.request_log)
        # A finished download (resumed at startup too) is a new local model at once.
        self.loader = Downloads(settings, store, on_done=catalog.refresh)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, pinned: list[str]) -> None:
        """Start the pool and load pinned models in the background: the server answers at
        once, requests for them wait for their load."""
        self.pool.start()
        self._background(self.pool.preload(pinned))
        self._background(self.loader.resume_unfinished())
        self._background(asyncio.to_thread(self.request_log.prune))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pool.close()
        await asyncio.to_thread(self.request_log.close)

    def _background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Generation -------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, record: RequestRecord) -> Generation:
        """Resolve the name, apply the profile's defaults and the limits, wait for a worker,
        and start; the record is filled as it goes and once more when the stream closes."""
        settings = self.settings
        record.model, record.stream = request.model, request.stream
        keep_text = settings.log_content
        if keep_text and request.content is not None:
            record.prompt = content_of(request.content())
        for choice in request.choices:
            limits.check(choice, settings)
        resolved = self.pool.resolve(request.model)
        record.resolved(
            resolved.model.id, resolved.profile["name"] if resolved.profile is not None else None
        )
        _serves(resolved.model, "chat")
        choices = [
            limits.capped(c.with_defaults(resolved.profile, settings.default_max_tokens), settings)
            for c in request.choices
        ]

        def closed(gen: Generation) -> None:
            record.generated(gen.usage)
            if gen.error is not None:
                record.failed(gen.error.status, gen.error.message)
            if gen.texts is not None:
                texts = ["".join(t) for t in gen.texts]
                record.completion = texts[0] if len(texts) == 1 else content_of(texts)

        gen = await self.pool.generate(resolved, choices, request.keep_alive, request.n, closed)
        if keep_text:
            gen.texts = [[] for _ in choices]
        return gen

    def _resolve(
        self,
        request: EmbeddingRequest | RerankRequest,
        record: RequestRecord,
        check: Callable[[Any, Settings], None],
    ) -> tuple[Resolved, dict[str, Any]]:
        """The request in its record (with its content, when content is logged), checked
        against the limits, and the model (and profile) it names."""
        record.model = request.model
        if self.settings.log_content and request.content is not None:
            record.prompt = content_of(request.content())
        check(request, self.settings)
        resolved = self.pool.resolve(request.model)
        profile = resolved.profile or {}
        record.resolved(resolved.model.id, profile.get("name"))
        return resolved, profile

    async def embed(self, request: EmbeddingRequest, record: RequestRecord) -> Embeddings:
        """Resolve the name, check the limits, apply the profile's pooling and context cap,
        and have the model's worker compute the vectors; the record takes the token count."""
        resolved, profile = self._resolve(request, record, limits.check_embedding)
        _serves(resolved.model, "embedding")
        pooling = request.pooling or profile.get("pooling") or default_pooling(resolved.model)
        payload = request.payload(pooling, profile.get("context_length"))
        result = await self.pool.embed(resolved, payload, request.keep_alive)
        record.generated(Usage(prompt_tokens=result.prompt_tokens))
        return result

    async def rerank(self, request: RerankRequest, record: RequestRecord) -> Ranking:
        """Score documents for a query on a language model that reranks (a profile's
        `rerank`, or a model named as a reranker), through the pool like any request."""
        resolved, profile = self._resolve(request, record, limits.check_rerank)
        _reranks(resolved.model, profile, request.model)
        payload = request.payload(profile.get("context_length"))
        result = await self.pool.embed(resolved, payload, request.keep_alive)
        ranking = Ranking([row[0] for row in result.floats()], result.tokens)
        record.generated(Usage(prompt_tokens=ranking.prompt_tokens))
        return ranking

    def finish(self, record: RequestRecord) -> None:
        """A request is over: one line in the server log; for generation requests also a row
        in the request log and the metrics."""
        row = record.row()
        quiet = record.endpoint in QUIET_PATHS and (record.status or 0) < 400
        # An MCP client's GET /mcp stream (messages from the server) lasts until the client
        # closes it: that is its normal end, not a request that failed with 499.
        quiet = quiet or (
            record.method == "GET" and record.endpoint == "/mcp" and record.status == CANCELLED
        )
        level = logging.DEBUG if quiet else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(level, "request", extra={"fields": record.fields(row)})
        if record.endpoint in GENERATION_ENDPOINTS:
            self.metrics_registry.request(record)
            self.request_log.add(row)

    async def flush_requests(self) -> None:
        await asyncio.to_thread(self.request_log.flush)

    async def metrics(self) -> str:
        return self.metrics_registry.exposition().decode()

    # Workers ----------------------------------------------------------------------------------

    async def workers(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "data": pool.status(),
            "memory_budget_bytes": pool.budget,
            "memory_used_bytes": pool.memory_used(),
            "memory_estimate_factor": pool.estimate.factor,
            "spare": pool.spare_status(),
        }

    async def load(self, name: str) -> dict[str, Any]:
        return await self.pool.load(name)

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        return await self.pool.unload(name, force=force)

    # Downloads --------------------------------------------------------------------------------

    async def start_download(self, repo: str) -> dict[str, Any]:
        return (await self.loader.start(repo)).status_dict()

    async def wait_download(
        self, job: dict[str, Any], progress: DownloadProgress | None
    ) -> dict[str, Any]:
        return await self.loader.wait(self.loader.get(job["id"]), progress)

    async def downloads(self) -> list[dict[str, Any]]:
        return self.loader.list()

    async def download(self, job_id: str) -> dict[str, Any]:
        return self.loader.get(job_id).status_dict()

    async def cancel_download(self, job_id: str) -> dict[str, Any]:
        return await self.loader.cancel(job_id)


def default_pooling(model: LocalModel) -> Pooling:
    """The pooling a model declares (sentence-transformers' 1_Pooling), else: an encoder's
    mean; a language model made for embeddings (Qwen3-Embedding: its kind says so) read at its
    last token, as it was trained; any other language model at the mean of its tokens, which
    says more about the whole text than its last token does."""
    declared = declared_pooling(model.path)
    if declared in ("cls", "mean", "last"):
        return cast(Pooling, declared)
    return "last" if model.kind == "embedding" and not model.encoder else "mean"


def _a(kind: str) -> str:
    return f"{'an' if kind == 'embedding' else 'a'} {kind} model"


def _runnable(model: LocalModel) -> None:
    """Refuse an encoder model when the library that runs encoders is not installed."""
    if model.encoder and importlib.util.find_spec("mlx_embeddings") is None:
        raise errors.InvalidRequest(
            f"Model '{model.id}' is {_a(model.kind)} "
            f"({(model.config.get('architectures') or ['?'])[0]}); encoder models run on "
            "mlx-embeddings, which is not installed: pip install 'mlx-manager[encoders]'.",
            param="model",
            code="encoder_library_missing",
        )


def _serves(model: LocalModel, what: str) -> None:
    """Refuse a request a model cannot serve, saying what it is for. Language models chat
    and embed (by pooling); embedding models (encoders, Qwen3-Embedding) only embed;
    rerankers only rerank."""
    kind = model.kind
    if what == "chat" and kind != "chat":
        raise errors.InvalidRequest(
            f"Model '{model.id}' is {_a(kind)}, not a chat model: it cannot chat or complete "
            "text" + (" (use /v1/embeddings)." if kind == "embedding" else " (use /v1/rerank)."),
            param="model",
            code="model_kind_mismatch",
        )
    if what == "embedding" and kind == "reranker":
        raise errors.InvalidRequest(
            f"Model '{model.id}' is a reranker: it scores documents for a query (use "
            "/v1/rerank), it does not make embeddings.",
            param="model",
            code="model_kind_mismatch",
        )
    _runnable(model)


def _reranks(model: LocalModel, profile: dict[str, Any], name: str) -> None:
    """Refuse to rerank with a model that has no way to: rerankers do (cross-encoders, and
    language models named as rerankers: Qwen3-Reranker), and so does a language model whose
    profile says how (`rerank`)."""
    kind = model.kind
    if kind == "reranker" or (kind == "chat" and profile.get("rerank")):
        _runnable(model)
        return
    if kind == "chat":
        raise errors.InvalidRequest(
            f"Model '{name}' is a language model with no way to rerank: use a reranker "
            "(a cross-encoder, or Qwen3-Reranker), or a profile of this model with "
            "`rerank: yes_no` if it was trained to answer yes or no to a query and a document.",
            param="model",
            code="model_kind_mismatch",
        )
    raise errors.InvalidRequest(
        f"Model '{model.id}' is an embedding model: it makes vectors (use /v1/embeddings), it "
        "does not score documents. Rerank with a cross-encoder or a Qwen3-Reranker.",
        param="model",
        code="model_kind_mismatch",
    )
