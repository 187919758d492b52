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
PADDING = 1.25  # the longest input of a batch, at most this times its shortest (plus 4 tokens)


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
        if truncate:
            tokens = tokens[:limit]
        check(i, tokens, limit, vocab_size)
        ids.append(tokens)
    return ids


def check(i: int, tokens: list[int], limit: int, vocab_size: int) -> None:
    """Refuse input `i` if it is empty, longer than `limit` or outside the vocabulary."""
    if not tokens:
        raise EmbedError("InvalidRequest", f"input[{i}] has no tokens.")
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


def batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Input indices grouped for forward passes: by length, each group within `budget` padded
    tokens (an input longer than that goes alone), and a new group where an input is over a
    quarter longer than its group's shortest, so padding stays under about a quarter of the
    work (on this CPU a batch of 64 mixed lengths ran ~30% faster in 4 such groups than in one:
    bench/bench_embeddings.py)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    group: list[int] = []
    for i in order:
        # Sorted by length: this input is the longest of the group so far.
        full = (len(group) + 1) * lengths[i] > budget
        if group and (full or lengths[i] > PADDING * lengths[group[0]] + 4):
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups


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


def pool(hidden: Any, n: Any, how: str | None) -> Any:
    """Pool (batch, width, dim) hidden states over each row's `n` real tokens: their mean,
    the first (an encoder's [CLS]) or the last."""
    import mlx.core as mx

    if how == "mean":
        width = hidden.shape[1]
        mask = (mx.arange(width)[None, :] < n[:, None]).astype(mx.float32)
        return (hidden * mask[..., None]).sum(axis=1) / n[:, None].astype(mx.float32)
    if how == "cls":
        return hidden[:, 0]
    return hidden[mx.arange(hidden.shape[0]), n - 1]


def _answer_token(tokenizer: Any, word: str) -> int:
    """The token a "yes" or "no" answer starts with."""
    return int(tokenizer.encode(word, add_special_tokens=False)[0])


class Job:
    """One Embed request (vectors, or rerank scores), computed one batch at a time between
    decode steps: a long request neither stalls the model's generations for its whole length
    nor outlives its client (a Cancel drops it between two batches). Its inputs are tokenized
    and checked when it is made, so a bad one fails before any work."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        request: dict[str, Any],
        context_length: int,
        vocab_size: int,
    ) -> None:
        self.request = request
        self.rerank = request.get("task") == "rerank"
        limit = min(context_length, request.get("context_length") or context_length)
        if self.rerank:
            prompts = [
                rerank_prompt(request["query"], d, request.get("instruction"))
                for d in request["documents"]
            ]
            try:
                self.ids = tokenize(tokenizer, prompts, limit, vocab_size)
            except EmbedError as e:  # name the document, not the prompt built around it
                raise EmbedError(e.kind, str(e).replace("input[", "documents[")) from None
            self.forward = model  # its logits
            self.answers = (_answer_token(tokenizer, "no"), _answer_token(tokenizer, "yes"))
        else:
            truncate = bool(request.get("truncate"))
            self.ids = tokenize(tokenizer, request["inputs"], limit, vocab_size, truncate)
            self.forward = body_of(model)  # its final hidden states
        self.start()

    def start(self, pad: int = 0) -> None:
        """Batch the tokenized inputs. `pad` fills a short input's row: causal models never
        read it; encoders mask it out."""
        self.pad = pad
        self.lengths = [len(t) for t in self.ids]
        self.groups = batches(self.lengths)
        self.rows: list[Any] = [None] * len(self.ids)

    @property
    def done(self) -> bool:
        return not self.groups

    def step(self) -> None:
        """One forward pass: the next batch of inputs."""
        import mlx.core as mx
        import numpy as np

        group = self.groups.pop(0)
        lengths = self.lengths
        width = max(lengths[i] for i in group)
        padded = mx.array([self.ids[i] + [self.pad] * (width - lengths[i]) for i in group])
        n = mx.array([lengths[i] for i in group])
        pooled = self.pooled(group, padded, n)
        mx.eval(pooled)
        dimensions = self.request.get("dimensions")
        if not self.rerank and dimensions is not None and dimensions > pooled.shape[1]:
            raise EmbedError(
                "InvalidRequest",
                f"dimensions is {dimensions}; this model's embeddings have {pooled.shape[1]}.",
            )
        for row, i in zip(np.array(pooled, dtype=np.float32), group, strict=True):
            self.rows[i] = row

    def pooled(self, group: list[int], padded: Any, n: Any) -> Any:
        """A batch's vectors (or scores, as vectors of one): a language model's last or mean
        hidden state, or its probability of "yes"."""
        import mlx.core as mx

        last = mx.arange(len(group)), n - 1  # each input's last real token
        out = self.forward(padded).astype(mx.float32)  # (batch, width, dim or vocabulary)
        if self.rerank:
            no, yes = self.answers
            logits = out[last]
            pooled = mx.softmax(mx.stack([logits[:, no], logits[:, yes]], axis=-1), axis=-1)
            return pooled[:, 1:]  # P(yes), as a vector of one
        return pool(out, n, self.request.get("pooling"))

    def result(self) -> tuple[bytes, int, list[int]]:
        """(float32 vectors as bytes, their dimension, each input's tokens), once done."""
        import numpy as np

        vectors = np.stack(self.rows)
        dim = vectors.shape[1]
        if not self.rerank:
            dimensions = self.request.get("dimensions")
            if dimensions is not None:  # step() checked that there are this many
                vectors, dim = vectors[:, :dimensions], dimensions
            if self.request.get("normalize", True):
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, 1e-12)
        return vectors.astype("<f4").tobytes(), dim, self.lengths


def embed(
    model: Any, tokenizer: Any, request: dict[str, Any], context_length: int, vocab_size: int
) -> tuple[bytes, int, list[int]]:
    """An Embed request computed whole (benchmarks, in-process callers)."""
    job = Job(model, tokenizer, request, context_length, vocab_size)
    while not job.done:
        job.step()
    return job.result()
