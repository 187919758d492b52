"""POST /v1/embeddings, OpenAI's shape: the body parsed and checked here, the vectors from the
service's one embedding path, rendered as floats or as base64 of their float32 bytes (what the
openai SDK asks for unless told otherwise)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import parse_duration
from gateway.engine.request import EmbeddingRequest
from gateway.fields import Tokens
from gateway.http.handler import (
    parse_body,
    record_of,
    service_of,
    unless_disconnected,
)
from gateway.http.schemas import KeepAlive


def inputs_of(value: Any) -> list[str | list[int]]:
    """OpenAI's `input` as a list of texts or token lists: a string, a list of strings, a
    list of token ids (one input), or a list of such lists. ValueError names the bad item."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("give a string, a list of strings, or token ids")
    if not value:
        raise ValueError("it is empty: give a string or a list of them")
    if all(_token(t) for t in value):
        return [list(value)]
    items: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, list) and all(_token(t) for t in item):
            items.append(list(item))
        else:
            raise ValueError(
                f"input[{i}] is {_describe(item)}: every item must be a string, or every item "
                "a token id (a non-negative integer) or a list of them"
            )
    return items


def _token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _describe(item: Any) -> str:
    if isinstance(item, list):
        return "a list that is not all token ids"
    if isinstance(item, int) and not isinstance(item, bool):
        return "a token id among strings" if item >= 0 else "a negative number"
    return {dict: "an object", bool: "a boolean", float: "a number", type(None): "null"}.get(
        type(item), type(item).__name__
    )


_TEXT = {"type": "string", "minLength": 1}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_INPUT_SCHEMAS = [
    _TEXT,
    {"type": "array", "items": _TEXT, "minItems": 1},
    _TOKENS,
    {"type": "array", "items": _TOKENS, "minItems": 1},
]


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    # Validated by inputs_of, for messages that name the bad item; the schema says the rest.
    input: Annotated[Any, Field(json_schema_extra={"anyOf": _INPUT_SCHEMAS})]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Tokens | None = None
    user: str | None = None
    # mlx-manager's own: how the hidden states are pooled (a profile's `pooling` otherwise),
    # whether the vectors are normalised, and Ollama's keep_alive.
    pooling: Literal["last", "mean", "cls"] | None = None
    normalize: bool = True
    truncate: bool = False  # cut inputs longer than the context instead of a 400 (Ollama's)
    keep_alive: KeepAlive = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        inputs_of(v)
        return v

    def embedding_request(self) -> EmbeddingRequest:
        inputs = inputs_of(self.input)
        return EmbeddingRequest(
            model=self.model,
            inputs=inputs,
            pooling=self.pooling,
            normalize=self.normalize,
            dimensions=self.dimensions,
            truncate=self.truncate,
            keep_alive=parse_duration(self.keep_alive),
            content=lambda: inputs,
        )


async def create_embeddings(request: Request) -> Response:
    body = await parse_body(request, EmbeddingBody)
    work = service_of(request).embed(body.embedding_request(), record_of(request))
    result = await unless_disconnected(request, work)
    vectors: list[Any] = result.base64() if body.encoding_format == "base64" else result.floats()
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "model": body.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


ROUTES = [Route("/v1/embeddings", create_embeddings, methods=["POST"])]
