"""The backend of a service beside a running server (`mlx-manager mcp` over stdio, the CLI): the
server owns the workers and the downloads, so every such operation goes to it over HTTP, and it
records the requests it serves."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx

from config.settings import Settings
from gateway import errors
from gateway.catalog.hub import DownloadProgress
from gateway.engine.protocol import Finished, Output, Reasoning, Text, ToolCallArgs, ToolCallStart
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
from gateway.service.keys import client_key

PROGRESS_INTERVAL = 0.5


class RemoteStream:
    """A finished answer of the server, read as the events a local stream would have given."""

    def __init__(self, choices: list[Choice], usage: Usage) -> None:
        self._choices = choices
        self._usage = usage

    async def __aiter__(self) -> AsyncIterator[Output]:
        for c in self._choices:
            if c.reasoning:
                yield Reasoning(c.index, c.reasoning)
            if c.text:
                yield Text(c.index, c.text, None)
            for call_id, name, arguments in c.tool_calls:
                yield ToolCallStart(c.index, call_id, name)
                yield ToolCallArgs(c.index, arguments)
            yield Finished(c.index, c.finish_reason or "stop", c.completion_tokens)

    async def collect(self) -> list[Choice]:
        return self._choices

    @property
    def usage(self) -> Usage:
        return self._usage

    def close(self) -> None:
        pass


class RemoteBackend:
    def __init__(self, settings: Settings, base_url: str) -> None:
        key = client_key(settings)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=base_url, timeout=None, headers=headers)

    async def start(self, pinned: list[str]) -> None:
        pass  # the server loads its pinned models itself

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = await self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise errors.ModelUnavailable(
                f"The mlx-manager server at {self.http.base_url} did not answer: {e}"
            ) from None
        if r.status_code >= 400:
            raise errors.from_body(r.status_code, r.content)
        return r.json()

    # Generation -------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, record: RequestRecord) -> RemoteStream:
        """Through the server's /v1, which resolves, limits and logs it (under the local key's
        name): the record here is not written."""
        first = request.choices[0]
        chat = first.kind == "chat"
        body: dict[str, Any] = {"model": request.model, "n": request.n}
        if chat:
            body["messages"] = first.messages
        else:
            body["prompt"] = [c.prompt for c in request.choices[:: request.n]]
        for name in ("max_tokens", "temperature", "top_p", "seed", "stop"):
            value = getattr(first, name)
            if value not in (None, []):
                body[name] = value
        if request.keep_alive is not None:
            body["keep_alive"] = request.keep_alive
        if chat:  # thinking, in /v1's words: the most explicit template variable, a budget
            variables = dict(first.template_kwargs)
            if first.thinking is not None:
                variables["enable_thinking"] = first.thinking
            if variables:
                body["chat_template_kwargs"] = variables
            if first.reasoning_budget is not None:
                body["thinking_budget_tokens"] = first.reasoning_budget
        data = await self._call("POST", "/v1/chat/completions" if chat else "/v1/completions", body)
        choices = []
        for c in data["choices"]:
            message = c.get("message") or {}
            choices.append(
                Choice(
                    c["index"],
                    text=(message.get("content") if chat else c.get("text")) or "",
                    finish_reason=c["finish_reason"],
                    reasoning=message.get("reasoning_content") or "",
                    tool_calls=[
                        [t["id"], t["function"]["name"], t["function"]["arguments"]]
                        for t in message.get("tool_calls") or []
                    ],
                )
            )
        u = data["usage"]
        usage = Usage(
            prompt_tokens=u["prompt_tokens"],
            completion_tokens=u["completion_tokens"],
            cached_tokens=(u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            reasoning_tokens=(u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0),
            finish_reasons=list(dict.fromkeys(c.finish_reason for c in choices if c.finish_reason)),
        )
        if len(choices) == 1:
            choices[0].completion_tokens = usage.completion_tokens
        return RemoteStream(choices, usage)

    async def embed(self, request: EmbeddingRequest, record: RequestRecord) -> Embeddings:
        """Through the server's /v1/embeddings (base64: the vectors' exact bytes)."""
        body: dict[str, Any] = {
            "model": request.model,
            "input": request.inputs,
            "encoding_format": "base64",
            "normalize": request.normalize,
            "truncate": request.truncate,
        }
        for name in ("pooling", "dimensions", "keep_alive"):
            if getattr(request, name) is not None:
                body[name] = getattr(request, name)
        data = await self._call("POST", "/v1/embeddings", body)
        rows = [base64.b64decode(d["embedding"]) for d in data["data"]]
        tokens = data["usage"]["prompt_tokens"]
        # The server reports the total only: spread it so that the sum is exact.
        per = [tokens // len(rows)] * len(rows)
        per[0] += tokens - sum(per)
        return Embeddings(b"".join(rows), len(rows[0]) // 4, per)

    async def rerank(self, request: RerankRequest, record: RequestRecord) -> Ranking:
        """Through the server's /v1/rerank, every result back in the documents' order."""
        body: dict[str, Any] = {
            "model": request.model,
            "query": request.query,
            "documents": request.documents,
        }
        if request.instruction is not None:
            body["instruction"] = request.instruction
        if request.keep_alive is not None:
            body["keep_alive"] = request.keep_alive
        data = await self._call("POST", "/v1/rerank", body)
        scores = [0.0] * len(request.documents)
        for r in data["results"]:
            scores[r["index"]] = r["relevance_score"]
        tokens = data["usage"]["prompt_tokens"]
        per = [tokens // len(scores)] * len(scores)
        per[0] += tokens - sum(per)
        return Ranking(scores, per)

    def finish(self, record: RequestRecord) -> None:
        pass  # the server that served the request has recorded it

    async def flush_requests(self) -> None:
        pass  # the server's writer flushes within a quarter of a second

    async def metrics(self) -> str:
        try:
            r = await self.http.get("/metrics")
        except httpx.HTTPError as e:
            raise errors.ModelUnavailable(f"The server did not answer: {e}") from None
        if r.status_code >= 400:
            raise errors.from_body(r.status_code, r.content)
        return r.text

    # Workers ----------------------------------------------------------------------------------

    async def workers(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/admin/workers")
        return result

    async def load(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/admin/load", {"model": name})
        return result

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        body = {"model": name, "force": force}
        result: dict[str, Any] = await self._call("POST", "/admin/unload", body)
        return result

    # Downloads: the server runs them, so its job list and resume cover them ------------------

    async def start_download(self, repo: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/admin/downloads", {"model": repo})
        return result

    async def wait_download(
        self, job: dict[str, Any], progress: DownloadProgress | None
    ) -> dict[str, Any]:
        while job["status"] in ("queued", "running"):
            if progress is not None:
                await progress(job)
            await asyncio.sleep(PROGRESS_INTERVAL)
            job = await self.download(job["id"])
        if progress is not None:
            await progress(job)
        return job

    async def downloads(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/admin/downloads"))["data"]
        return result

    async def download(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/admin/downloads/{job_id}")
        return result

    async def cancel_download(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("DELETE", f"/admin/downloads/{job_id}")
        return result
