"""Errors the service layer raises. Each carries what an OpenAI error body needs; the HTTP
adapter turns them into JSON with the right status, the MCP adapter into tool errors."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body, the one shape every HTTP error answer has (from_body reads it)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class InvalidRequest(ServiceError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class NotFound(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ServiceError):
    """The thing to create exists already (a profile name, an alias)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ModelUnavailable(ServiceError):
    """The model's worker failed to load or died: this request fails, the next one retries."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class PermissionDenied(ServiceError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class HostNotAllowed(PermissionDenied):
    """A Host header not among this server's names: DNS rebinding, or a name to allow."""

    code = "host_not_allowed"


class OriginNotAllowed(PermissionDenied):
    """A request from a web page whose origin is neither this server nor an allowed one."""

    code = "origin_not_allowed"


class UnsupportedMediaType(ServiceError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RequestTimeout(ServiceError):
    """The request's body did not arrive in time; the connection is closed after the answer,
    as what is left of the body would otherwise be read as the next request."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class TooManyRequests(ServiceError):
    """The model's queue is full: come back shortly."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class InsufficientMemory(ServiceError):
    """The model cannot fit in the memory budget, even with everything else unloaded."""

    status = 507
    type = "server_error"
    code = "insufficient_memory"


class DiskFull(ServiceError):
    """The disk under MLX_MANAGER_HOME is full: nothing was saved."""

    status = 507
    type = "server_error"
    code = "disk_full"


class Unauthorized(ServiceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ServiceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ConcurrencyLimit(TooManyRequests):
    """This API key has as many requests in flight as it may."""

    code = "concurrency_limit"


def from_body(status: int, content: bytes) -> ServiceError:
    """The error a server's OpenAI error body stands for: the class with its status and code
    (the most specific one), keeping its message and param (a remote call's error, raised
    again here)."""
    import json

    try:
        err = json.loads(content)["error"]
        message, param, code = err["message"], err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, param, code = f"HTTP {status}: {content[:200]!r}", None, None
    matches = [c for c in _classes(ServiceError) if c.status == status]
    cls = next((c for c in matches if c.code == code), None) or next(
        (c for c in matches if c.code is None or c.__base__ is ServiceError), ServiceError
    )
    error = cls(message, param=param)
    if cls is ServiceError:
        error.status = status
    return error


def _classes(base: type[ServiceError]) -> list[type[ServiceError]]:
    found = []
    for sub in base.__subclasses__():
        found += [sub, *_classes(sub)]
    return found
