"""Which shape an error answer takes: each protocol's clients parse their own (OpenAI's
`{"error": {"message", "type", "param", "code"}}`, Anthropic's `{"type": "error", "error":
{"type", "message"}}`, Ollama's `{"error": "..."}`). Chosen by path, so that the middleware's
refusals (a missing key, a body too large, a foreign origin) reach a client in the shape its
SDK reads, like the handlers' own errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse

from gateway.errors import ServiceError

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_body(exc: ServiceError, request_id: str | None = None) -> dict[str, Any]:
    kind = ANTHROPIC_TYPES.get(exc.status)
    if kind is None:
        kind = "invalid_request_error" if 400 <= exc.status < 500 else "api_error"
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": exc.message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def openai_body(exc: ServiceError, request_id: str | None = None) -> dict[str, Any]:
    return exc.body()


def ollama_body(exc: ServiceError, request_id: str | None = None) -> dict[str, Any]:
    """Ollama's clients read `{"error": "..."}` and the status."""
    return {"error": exc.message}


# Path prefix -> body of an error answer there; the first match wins, OpenAI's is the default.
SHAPES: list[tuple[str, Callable[[ServiceError, str | None], dict[str, Any]]]] = [
    ("/v1/messages", anthropic_body),
    ("/api", ollama_body),
]


def shape_for(path: str) -> Callable[[ServiceError, str | None], dict[str, Any]]:
    for prefix, shape in SHAPES:
        if path == prefix or path.startswith(prefix + "/"):
            return shape
    return openai_body


def error_response(path: str, exc: ServiceError, request_id: str | None = None) -> JSONResponse:
    body = shape_for(path)(exc, request_id)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)
