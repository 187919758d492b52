"""The OpenAPI description of the /v1 API, served at /openapi.json. Request bodies come from
the pydantic schemas that validate them, so the description cannot drift from the code."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.http.embeddings import EmbeddingBody
from gateway.http.messages_schema import CountTokensRequest, MessagesRequest
from gateway.http.ollama_schema import (
    ChatRequest,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    ModelBody,
)
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


# Ollama's API answers errors as {"error": "..."}.
OLLAMA_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _responses(ok: str, errors: tuple[int, ...], shape: str = "Error") -> dict[str, Any]:
    error = {"$ref": f"#/components/schemas/{shape}"}
    out: dict[str, Any] = {"200": {"description": ok, "content": _json({"type": "object"})}}
    for status in (*errors, 401):
        out[str(status)] = {"description": f"An error ({shape})", "content": _json(error)}
    return out


def _ollama(summary: str, schema: str | None = None) -> dict[str, Any]:
    """An Ollama endpoint: POST with a body when it has a schema, else GET."""
    if schema is None:
        return {"get": {"summary": summary, "responses": _responses("OK", (), "OllamaError")}}
    responses = _responses(
        "JSON, or NDJSON lines when streamed", (400, 403, 404, 413, 415, 429, 503), "OllamaError"
    )
    return _post(summary, schema, responses)


def _post(summary: str, schema: str, responses: dict[str, Any]) -> dict[str, Any]:
    body = {"required": True, "content": _json({"$ref": f"#/components/schemas/{schema}"})}
    return {"post": {"summary": summary, "requestBody": body, "responses": responses}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _generation(summary: str, schema: str) -> dict[str, Any]:
    responses = _responses(
        "The completion (JSON), or a stream of SSE chunks",
        (400, 403, 404, 408, 413, 415, 429, 503, 507),
    )
    return _post(summary, schema, responses)


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
            (ChatRequest, "validation"),
            (GenerateBody, "validation"),
            (EmbedBody, "validation"),
            (EmbeddingsBody, "validation"),
            (ModelBody, "validation"),
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
            "description": "OpenAI-, Anthropic- and Ollama-compatible API for local MLX models.",
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
            # Ollama's API, for apps that speak only it (errors: {"error": "..."}).
            "/api/version": {"get": {**_ollama("Ollama API version")["get"], "security": []}},
            "/api/tags": _ollama("Names, as Ollama lists models"),
            "/api/ps": _ollama("Loaded models (Ollama)"),
            "/api/show": _ollama("A model's details (Ollama)", "ModelBody"),
            "/api/chat": _ollama("Chat (Ollama), NDJSON unless stream is false", "ChatRequest"),
            "/api/generate": _ollama("Generate (Ollama)", "GenerateBody"),
            "/api/embed": _ollama("Embeddings (Ollama)", "EmbedBody"),
            "/api/embeddings": _ollama("One embedding (Ollama's older endpoint)", "EmbeddingsBody"),
        },
        "components": {
            "schemas": {**defs["$defs"], "Error": ERROR, "OllamaError": OLLAMA_ERROR},
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
