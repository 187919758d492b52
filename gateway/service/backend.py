"""What the service needs of whoever owns the workers and the downloads: the pool in this process
(local.py), or a running server over HTTP (remote.py). The service takes one and
does not ask which; every answer comes from the place that owns the state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from gateway.catalog.hub import DownloadProgress
from gateway.engine.protocol import Output
from gateway.engine.request import (
    Choice,
    EmbeddingRequest,
    Embeddings,
    GenerateRequest,
    Ranking,
    RerankRequest,
)
from gateway.observe.requestlog import RequestRecord
from gateway.observe.usage import Usage


class Stream(Protocol):
    """A generation in progress, local or remote: its events, then its usage."""

    def __aiter__(self) -> AsyncIterator[Output]: ...

    async def collect(self) -> list[Choice]: ...

    @property
    def usage(self) -> Usage: ...

    def close(self) -> None: ...


class Backend(Protocol):
    async def start(self, pinned: list[str]) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, request: GenerateRequest, record: RequestRecord) -> Stream: ...

    async def embed(self, request: EmbeddingRequest, record: RequestRecord) -> Embeddings: ...

    async def rerank(self, request: RerankRequest, record: RequestRecord) -> Ranking: ...

    def finish(self, record: RequestRecord) -> None: ...

    async def flush_requests(self) -> None:
        """Wait until the request log rows of requests already finished are written."""
        ...

    async def metrics(self) -> str:
        """The Prometheus exposition of whoever serves the requests."""
        ...

    async def workers(self) -> dict[str, Any]:
        """{"data": per-model status, "memory_budget_bytes", "memory_used_bytes",
        "memory_estimate_factor", "spare"}: GET /admin/workers' body."""
        ...

    async def load(self, name: str) -> dict[str, Any]: ...

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]: ...

    async def start_download(self, repo: str) -> dict[str, Any]: ...

    async def wait_download(
        self, job: dict[str, Any], progress: DownloadProgress | None
    ) -> dict[str, Any]: ...

    async def downloads(self) -> list[dict[str, Any]]: ...

    async def download(self, job_id: str) -> dict[str, Any]: ...

    async def cancel_download(self, job_id: str) -> dict[str, Any]: ...
