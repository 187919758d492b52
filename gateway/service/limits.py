"""Request limits a server owner sets (MLX_MANAGER_MAX_*): checked once, in the service, for
every way in (/v1, MCP `chat`), before a request takes a place in a model's queue."""

from __future__ import annotations

from dataclasses import replace

from config.settings import Settings
from gateway.engine.request import EmbeddingRequest, GenerationRequest, RerankRequest
from gateway.errors import InvalidRequest


def check(request: GenerationRequest, settings: Settings) -> None:
    """Refuse what the client asked beyond the limits, naming the limit and its setting."""
    too_many = request.max_tokens is not None and request.max_tokens > settings.max_tokens_limit
    if too_many and not request.clamp_max_tokens:  # clamped: capped() cuts it to the limit
        raise InvalidRequest(
            f"max_tokens is {request.max_tokens}; this server allows at most "
            f"{settings.max_tokens_limit} (MLX_MANAGER_MAX_TOKENS_LIMIT).",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    messages = request.messages or []
    if len(messages) > settings.max_messages:
        raise InvalidRequest(
            f"The request has {len(messages)} messages; this server accepts at most "
            f"{settings.max_messages} (MLX_MANAGER_MAX_MESSAGES).",
            param="messages",
            code="too_many_messages",
        )
    chars = len(request.prompt or "") + sum(len(str(m.get("content") or "")) for m in messages)
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(
            f"The prompt is {chars:,} characters; this server accepts at most "
            f"{settings.max_prompt_chars:,} (MLX_MANAGER_MAX_PROMPT_CHARS).",
            param="messages" if request.messages is not None else "prompt",
            code="prompt_too_long",
        )


def capped(request: GenerationRequest, settings: Settings) -> GenerationRequest:
    """With no max_tokens from the request or its profile, generation stops at the limit
    (or the end of the context, whichever comes first), not only at the end of the context."""
    if request.max_tokens is None or request.max_tokens > settings.max_tokens_limit:
        return replace(request, max_tokens=settings.max_tokens_limit)
    return request


def check_embedding(request: EmbeddingRequest, settings: Settings) -> None:
    """Refuse an embedding request with nothing to embed, an empty input, or more inputs or
    characters than the limits allow, naming which."""
    inputs = request.inputs
    if not inputs:
        raise InvalidRequest("input is empty: give a string or a list of them.", param="input")
    if len(inputs) > settings.max_embedding_inputs:
        raise InvalidRequest(
            f"The request has {len(inputs)} inputs; this server embeds at most "
            f"{settings.max_embedding_inputs} per request (MLX_MANAGER_MAX_EMBEDDING_INPUTS).",
            param="input",
            code="too_many_inputs",
        )
    for i, item in enumerate(inputs):
        if not item:
            what = "an empty string" if isinstance(item, str) else "an empty list of tokens"
            raise InvalidRequest(f"input[{i}] is {what}.", param="input")
        if isinstance(item, str) and len(item) > settings.max_prompt_chars:
            raise InvalidRequest(
                f"input[{i}] is {len(item):,} characters; this server accepts at most "
                f"{settings.max_prompt_chars:,} (MLX_MANAGER_MAX_PROMPT_CHARS).",
                param="input",
                code="prompt_too_long",
            )
    if request.dimensions is not None and request.dimensions < 1:
        raise InvalidRequest("dimensions must be at least 1.", param="dimensions")


def check_rerank(request: RerankRequest, settings: Settings) -> None:
    """Refuse a rerank request with no query or documents, an empty document, or more
    documents or characters than the limits allow."""
    if not request.query:
        raise InvalidRequest("query is empty.", param="query")
    if not request.documents:
        raise InvalidRequest("documents is empty: give at least one.", param="documents")
    if len(request.documents) > settings.max_embedding_inputs:
        raise InvalidRequest(
            f"The request has {len(request.documents)} documents; this server scores at most "
            f"{settings.max_embedding_inputs} per request (MLX_MANAGER_MAX_EMBEDDING_INPUTS).",
            param="documents",
            code="too_many_inputs",
        )
    chars = len(request.query) + max(len(d) for d in request.documents)
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(
            f"A query and document are {chars:,} characters; this server accepts at most "
            f"{settings.max_prompt_chars:,} (MLX_MANAGER_MAX_PROMPT_CHARS).",
            param="documents",
            code="prompt_too_long",
        )
    for i, document in enumerate(request.documents):
        if not document:
            raise InvalidRequest(f"documents[{i}] is empty.", param="documents")
