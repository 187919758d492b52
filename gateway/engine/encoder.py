"""Encoder models inside a worker process: BERT, XLM-RoBERTa, ModernBERT and the like, run by
mlx-embeddings (the optional `encoders` extra; mlx-lm runs decoders only). An embedding model's
hidden states are pooled (mean, [CLS] or last, over real tokens only) and normalised; a
cross-encoder (`*ForSequenceClassification`) scores (query, document) pairs for rerank.

Batches are padded with the tokenizer's pad token and masked, so an input's vector does not
depend on what it is batched with; they run one per loop turn like a language model's
embeddings (gateway/engine/embedder.py)."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from gateway.catalog.local import encoder_context, model_kind
from gateway.engine import embedder
from gateway.engine.generator import Engine
from gateway.engine.pipe import WorkerPipe
from gateway.engine.protocol import Event, Failed

INSTALL = "pip install 'mlx-manager[encoders]'"


def _module(config: dict[str, Any]) -> Any:
    """mlx-embeddings' module for this model's architecture."""
    family = str(config["model_type"]).replace("-", "_")
    return importlib.import_module(f"mlx_embeddings.models.{family}")


_HEADS = ("bert", "roberta", "xlm-roberta")


def _cross_encoder(config: dict[str, Any]) -> tuple[Any, Any, None, None]:
    """mlx-embeddings' encoder with a sequence-classification head on top, built as
    transformers builds one: BERT's linear layer over the pooled [CLS] state, RoBERTa's
    dense-tanh-projection over the [CLS] state. (mlx-embeddings 0.1 loads the encoders but
    not these heads; its loader takes the classes to build, so only the head is ours.)"""
    import mlx.core as mx
    import mlx.nn as nn

    arch = _module(config)
    labels = max(len(config.get("id2label") or {}), int(config.get("num_labels") or 1))
    bert = config["model_type"] == "bert"

    class RobertaHead(nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.dense = nn.Linear(hidden, hidden)
            self.out_proj = nn.Linear(hidden, labels)

        def __call__(self, cls: Any) -> Any:
            return self.out_proj(mx.tanh(self.dense(cls)))

    class CrossEncoder(arch.Model):  # type: ignore[name-defined]
        def __init__(self, args: Any) -> None:
            if not bert:
                args.add_pooling_layer = False  # RoBERTa's head reads [CLS] itself
            super().__init__(args)
            hidden = args.hidden_size
            self.classifier = nn.Linear(hidden, labels) if bert else RobertaHead(hidden)

        def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
            # transformers keeps the encoder under the family's name: bert.*, roberta.*
            prefixes = ("bert.", "roberta.", "model.")
            renamed = {}
            for k, v in weights.items():
                for p in prefixes:
                    if k.startswith(p):
                        k = k[len(p) :]
                        break
                renamed[k] = v
            cleaned: dict[str, Any] = super().sanitize(renamed)
            return cleaned

        def score(self, out: Any) -> Any:
            """Relevance in 0-1, as sentence-transformers' CrossEncoder gives it: the
            sigmoid of a single logit, else the last label's probability."""
            if bert:
                logits = self.classifier(out.pooler_output)
            else:
                logits = self.classifier(out.last_hidden_state[:, 0])
            logits = logits.astype(mx.float32)
            if labels == 1:
                return mx.sigmoid(logits)
            return mx.softmax(logits, axis=-1)[:, -1:]

    return CrossEncoder, arch.ModelArgs, None, None


def load(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """An encoder model, its tokenizer and its config.json."""
    config: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    try:
        from mlx_embeddings.utils import _get_classes, load_model
    except ImportError as e:
        raise RuntimeError(
            f"'{Path(path).name}' is an encoder model; serving it needs mlx-embeddings: {INSTALL}"
        ) from e
    from transformers import AutoTokenizer

    # ModernBERT's classifier is mlx-embeddings' own; BERT's and RoBERTa's heads are ours.
    ours = model_kind(config) == "reranker" and config.get("model_type") in _HEADS
    classes = _cross_encoder if ours else _get_classes
    model = load_model(Path(path), get_model_classes=classes, path_to_repo=str(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, config


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens around one text ([CLS] and [SEP], <s> and </s>): what an empty
    text encodes to, split where the start tokens end."""
    empty = list(tokenizer("")["input_ids"])
    starts = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    k = 0
    while k < len(empty) and empty[k] in starts:
        k += 1
    return empty[:k], empty[k:]


class Job(embedder.Job):
    """One Embed request on an encoder: texts (or pairs, for rerank) through the model's own
    tokenizer with its special tokens, then one masked forward pass per batch."""

    def __init__(
        self, model: Any, tokenizer: Any, request: dict[str, Any], context_length: int
    ) -> None:
        self.request = request
        self.model = model
        self.rerank = request.get("task") == "rerank"
        limit = min(context_length, request.get("context_length") or context_length)
        if self.rerank:
            # A document longer than the model's window is cut, as sentence-transformers
            # does: encoders' windows (512 tokens) are shorter than many passages.
            encoded = []
            query = request["query"]
            for i, document in enumerate(request["documents"]):
                try:  # only the document is cut, never the query
                    enc = tokenizer(query, document, truncation="only_second", max_length=limit)
                except Exception:  # the tokenizers library: "Sequence to truncate too short"
                    enc = tokenizer(query, document)
                if len(enc["input_ids"]) > limit:
                    raise embedder.EmbedError(
                        "ContextLengthExceeded",
                        f"The query is too long for this model: with documents[{i}] it takes "
                        f"{len(enc['input_ids'])} tokens, and the model reads at most {limit}.",
                    )
                encoded.append(enc)
        else:
            truncate = bool(request.get("truncate"))
            head, tail = _specials(tokenizer)
            encoded = []
            for i, item in enumerate(request["inputs"]):
                if isinstance(item, str):
                    enc = tokenizer(item, truncation=truncate, max_length=limit)
                else:  # token ids as given, between the model's own special tokens
                    ids = head + [int(t) for t in item] + tail
                    enc = {"input_ids": ids[:limit] if truncate else ids}
                embedder.check(i, enc["input_ids"], limit, len(tokenizer))
                encoded.append(enc)
        self.ids = [list(e["input_ids"]) for e in encoded]
        takes_types = "token_type_ids" in inspect.signature(model.__call__).parameters
        types = [e.get("token_type_ids") for e in encoded]
        self.types = [list(t) for t in types] if takes_types and all(types) else None
        self.start(pad=tokenizer.pad_token_id or 0)

    def pooled(self, group: list[int], padded: Any, n: Any) -> Any:
        import mlx.core as mx

        width = padded.shape[1]
        kwargs: dict[str, Any] = {
            "attention_mask": (mx.arange(width)[None, :] < n[:, None]).astype(mx.float32)
        }
        if self.types is not None:
            types = self.types
            kwargs["token_type_ids"] = mx.array(
                [types[i] + [0] * (width - len(types[i])) for i in group]
            )
        out = self.model(padded, **kwargs)
        if self.rerank:
            if hasattr(self.model, "score"):
                return self.model.score(out)
            # mlx-embeddings' own classifier (ModernBERT): probabilities already.
            return out.pooler_output.astype(mx.float32)[:, -1:]
        hidden = out.last_hidden_state.astype(mx.float32)
        if hidden.ndim == 2:  # pooled by the model itself, as its config says (ModernBERT)
            return hidden
        return embedder.pool(hidden, n, self.request.get("pooling"))


class EncoderEngine(Engine):
    """The worker loop for an encoder: the language model's loop (gateway/engine/generator.py)
    with embedding jobs only; an encoder generates nothing."""

    def __init__(self, model: Any, tokenizer: Any, conn: WorkerPipe, config: dict[str, Any]):
        import mlx.core as mx

        # Only what the loop, embeddings and reports use: no batch generator, prompt cache or
        # chat template for a model that cannot generate.
        self.mx = mx
        self.model = model
        self.tokenizer = tokenizer
        self.conn = conn
        self.context_length = encoder_context(config)
        self.seqs = {}
        self.uid_of = {}
        self.embeds = {}
        self.generated_total = 0
        self.reported = None
        self.reported_at = 0.0

    def submit(self, rid: str, req: dict[str, Any], events: list[Event]) -> None:
        events.append(
            Failed(rid, "InvalidRequest", "This is an encoder model: it cannot generate text.")
        )

    def new_job(self, req: dict[str, Any]) -> embedder.Job:
        return Job(self.model, self.tokenizer, req, self.context_length)
