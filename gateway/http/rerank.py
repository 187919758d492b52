"""POST /v1/rerank, in the shape llama.cpp, vLLM, Jina and Cohere share: a query and documents
in, `results` out (each document's `index` and `relevance_score`, best first, the `document`
too when asked), from the service's one rerank path."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import parse_duration
from gateway.engine.request import RerankRequest
from gateway.http.handler import (
    parse_body,
    record_of,
    service_of,
    unless_disconnected,
)
from gateway.http.schemas import KeepAlive


class DocumentText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str


class RerankBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    query: str
    documents: list[str | DocumentText]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = False
    # Qwen3-Reranker's task description ("Given a web search query, ..." unless given).
    instruction: str | None = None
    keep_alive: KeepAlive = None

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def rerank_request(self) -> RerankRequest:
        return RerankRequest(
            model=self.model,
            query=self.query,
            documents=self.texts,
            instruction=self.instruction,
            keep_alive=parse_duration(self.keep_alive),
            content=lambda: {"query": self.query, "documents": self.texts},
        )


async def rerank(request: Request) -> Response:
    body = await parse_body(request, RerankBody)
    work = service_of(request).rerank(body.rerank_request(), record_of(request))
    ranking = await unless_disconnected(request, work)
    order = sorted(range(len(ranking.scores)), key=lambda i: -ranking.scores[i])
    texts = body.texts
    results: list[dict[str, Any]] = []
    for i in order[: body.top_n]:
        result: dict[str, Any] = {"index": i, "relevance_score": ranking.scores[i]}
        if body.return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    tokens = ranking.prompt_tokens
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex[:24]}",
            "model": body.model,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


ROUTES = [Route("/v1/rerank", rerank, methods=["POST"])]
