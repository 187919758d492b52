"""Embeddings inside a worker process: a language model's final hidden states, pooled (the last
real token, or the mean over real tokens) and L2-normalised, as llama.cpp and Ollama embed with
any model.

Inputs are batched: sorted by length, right-padded to the longest of their batch, one forward
pass per batch. A causal model's real tokens attend only to the tokens before them, so padding
after them changes nothing they compute, and pooling reads real tokens only: an input's vector
does not depend on what it is batched with."""

from __future__ import annotations

from typing import Any

# Tokens in one forward pass (inputs x padded length): bounds the activations of a batch.
BATCH_TOKENS = 4096


class EmbedError(ValueError):
    """An input this model cannot embed; `kind` names the gateway.errors class."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def body_of(model: Any) -> Any:
    """The part of an mlx-lm model that returns its final (normed) hidden states: the
    transformer without its output head."""
    for path in (("model",), ("language_model", "model"), ("transformer",)):
        part = model
        for name in path:
            part = getattr(part, name, None)
        if part is not None and callable(part):
            return part
    raise EmbedError(
        "InvalidRequest",
        "This model's architecture gives no hidden states to pool into embeddings.",
    )


def tokenize(
    tokenizer: Any, inputs: list[Any], limit: int, vocab_size: int, truncate: bool = False
) -> list[list[int]]:
    """Each input as token ids (texts through the model's tokenizer, ids as given), checked
    against the context (or cut to it, with `truncate`) and the vocabulary."""
    ids: list[list[int]] = []
    for i, item in enumerate(inputs):
        tokens = tokenizer.encode(item) if isinstance(item, str) else [int(t) for t in item]
        if not tokens:
            raise EmbedError("InvalidRequest", f"input[{i}] has no tokens.")
        if truncate:
            tokens = tokens[:limit]
        if len(tokens) > limit:
            raise EmbedError(
                "ContextLengthExceeded",
                f"input[{i}] has {len(tokens)} tokens; this model takes at most {limit} "
                "tokens per input. Shorten it or split it.",
            )
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise EmbedError(
                "InvalidRequest",
                f"input[{i}]: token id {bad[0]} is outside this model's vocabulary of "
                f"{vocab_size} tokens.",
            )
        ids.append(tokens)
    return ids


def batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Input indices grouped for forward passes: by length, so padding stays small, each
    group within `budget` padded tokens (an input longer than that goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    group: list[int] = []
    for i in order:
        # Sorted by length: this input is the longest of the group so far.
        if group and (len(group) + 1) * lengths[i] > budget:
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups


def embed(
    model: Any,
    tokenizer: Any,
    request: dict[str, Any],
    context_length: int,
    vocab_size: int,
) -> tuple[bytes, int, list[int]]:
    """(float32 vectors as bytes, their dimension, each input's tokens) for an Embed request
    (gateway/engine/request.py EmbeddingRequest.payload)."""
    import mlx.core as mx
    import numpy as np

    limit = min(context_length, request.get("context_length") or context_length)
    ids = tokenize(tokenizer, request["inputs"], limit, vocab_size, bool(request.get("truncate")))
    body = body_of(model)
    mean = request.get("pooling") == "mean"
    lengths = [len(t) for t in ids]
    out: list[Any] = [None] * len(ids)
    for group in batches(lengths):
        width = max(lengths[i] for i in group)
        padded = mx.array([ids[i] + [0] * (width - lengths[i]) for i in group])
        hidden = body(padded).astype(mx.float32)  # (batch, width, dim)
        n = mx.array([lengths[i] for i in group])
        if mean:
            mask = (mx.arange(width)[None, :] < n[:, None]).astype(mx.float32)
            pooled = (hidden * mask[..., None]).sum(axis=1) / n[:, None].astype(mx.float32)
        else:
            pooled = hidden[mx.arange(len(group)), n - 1]
        mx.eval(pooled)
        rows = np.array(pooled, dtype=np.float32)
        for row, i in zip(rows, group, strict=True):
            out[i] = row
    vectors = np.stack(out)
    dim = vectors.shape[1]
    dimensions = request.get("dimensions")
    if dimensions is not None:
        if dimensions > dim:
            raise EmbedError(
                "InvalidRequest",
                f"dimensions is {dimensions}; this model's embeddings have {dim}.",
            )
        vectors, dim = vectors[:, :dimensions], dimensions
    if request.get("normalize", True):
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype("<f4").tobytes(), dim, lengths


# Qwen3-Reranker's prompt: the model judges one document against the query, answering "yes" or
# "no"; the score is the probability of "yes" against "no" at the answer's first token.
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def rerank_prompt(query: str, document: str, instruction: str | None) -> str:
    return (
        f"{RERANK_PREFIX}<Instruct>: {instruction or RERANK_INSTRUCTION}\n"
        f"<Query>: {query}\n<Document>: {document}{RERANK_SUFFIX}"
    )


def _answer_token(tokenizer: Any, word: str) -> int:
    """The token a "yes" or "no" answer starts with."""
    return int(tokenizer.encode(word, add_special_tokens=False)[0])


def rerank(
    model: Any,
    tokenizer: Any,
    request: dict[str, Any],
    context_length: int,
    vocab_size: int,
) -> tuple[bytes, int, list[int]]:
    """Relevance scores of documents for a query, as float32 bytes (one per document, dim 1)
    and each pair's tokens: P(yes) / (P(yes) + P(no)) after the reranker's prompt, batched as
    embeddings are (the full model this time: its logits, at each pair's last real token)."""
    import mlx.core as mx
    import numpy as np

    limit = min(context_length, request.get("context_length") or context_length)
    prompts = [
        rerank_prompt(request["query"], d, request.get("instruction")) for d in request["documents"]
    ]
    try:
        ids = tokenize(tokenizer, prompts, limit, vocab_size)
    except EmbedError as e:  # name the document, not the prompt built around it
        raise EmbedError(e.kind, str(e).replace("input[", "documents[")) from None
    yes, no = _answer_token(tokenizer, "yes"), _answer_token(tokenizer, "no")
    lengths = [len(t) for t in ids]
    scores = np.zeros(len(ids), dtype=np.float32)
    for group in batches(lengths):
        width = max(lengths[i] for i in group)
        padded = mx.array([ids[i] + [0] * (width - lengths[i]) for i in group])
        n = mx.array([lengths[i] for i in group])
        logits = model(padded)[mx.arange(len(group)), n - 1].astype(mx.float32)
        pair = mx.stack([logits[:, no], logits[:, yes]], axis=-1)
        p_yes = mx.softmax(pair, axis=-1)[:, 1]
        mx.eval(p_yes)
        scores[group] = np.array(p_yes, dtype=np.float32)
    return scores.astype("<f4").tobytes(), 1, lengths
