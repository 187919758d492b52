"""The OpenAPI description of the /v1 API, served at /openapi.json. Request bodies come from
the pydantic schemas that validate them, so the description cannot drift from the code."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.http.embeddings import EmbeddingBody
from gateway.http.messages_schema import CountTokensRequest, MessagesRequest
from gateway.http.rerank import RerankBody
from gateway.http.responses_schema import InputTokensRequest, ResponseCreate
from gateway.http.schemas import ChatCompletionRequest, CompletionRequest

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _responses(ok: str, errors: tuple[int, ...]) -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}
    out: dict[str, Any] = {"200": {"description": ok, "content": _json({"type": "object"})}}
    for status in (*errors, 401):
        out[str(status)] = {"description": "An error, in OpenAI's shape", "content": _json(error)}
    return out


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _generation(summary: str, schema: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": _json({"$ref": f"#/components/schemas/{schema}"}),
            },
            "responses": _responses(
                "The completion (JSON), or a stream of SSE chunks",
                (400, 403, 404, 408, 413, 415, 429, 503, 507),
            ),
        }
    }


@cache
def openapi_document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (ChatCompletionRequest, "validation"),
            (CompletionRequest, "validation"),
            (EmbeddingBody, "validation"),
            (RerankBody, "validation"),
            (ResponseCreate, "validation"),
            (InputTokensRequest, "validation"),
            (MessagesRequest, "validation"),
            (CountTokensRequest, "validation"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    try:
        app_version = version("mlx-manager")
    except PackageNotFoundError:
        app_version = "0"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlx-manager",
            "version": app_version,
            "description": "OpenAI- and Anthropic-compatible API for local MLX models.",
        },
        "paths": {
            "/health": {"get": {"summary": "Liveness", "security": [], "responses": _ok()}},
            "/v1/models": {"get": {"summary": "Models and profiles", "responses": _ok()}},
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "One model or profile",
                    "parameters": [
                        {
                            "name": "model_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": _responses("The model", (403, 404)),
                }
            },
            "/v1/chat/completions": _generation("Chat completion", "ChatCompletionRequest"),
            "/v1/completions": _generation("Text completion", "CompletionRequest"),
            "/v1/embeddings": _generation("Embeddings", "EmbeddingBody"),
            "/v1/rerank": _generation("Rerank documents for a query", "RerankBody"),
            "/v1/responses": _generation("Response (OpenAI Responses API)", "ResponseCreate"),
            "/v1/responses/input_tokens": _generation(
                "Count a response's input tokens", "InputTokensRequest"
            ),
            # Anthropic's Messages API: its errors are Anthropic's shape, {"type": "error",
            # "error": {"type", "message"}}.
            "/v1/messages": _generation("Message (Anthropic Messages API)", "MessagesRequest"),
            "/v1/messages/count_tokens": _generation(
                "Count a message's input tokens (Anthropic)", "CountTokensRequest"
            ),
            "/v1/responses/{response_id}": {
                "get": _stored("A stored response"),
                "delete": _stored("Delete a stored response"),
            },
            "/v1/responses/{response_id}/input_items": {
                "get": _stored("A stored response's input items (limit, order, after)")
            },
        },
        "components": {
            "schemas": {**defs["$defs"], "Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _stored(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [
            {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "responses": _responses("OK", (400, 404)),
    }


def _ok() -> dict[str, Any]:
    return _responses("OK", ())
