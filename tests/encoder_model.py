"""Tiny real encoder models for the embedding and rerank tests: BERT (an embedding model, and a
cross-encoder with transformers' sequence-classification head) and an XLM-RoBERTa
cross-encoder, with random weights under the names transformers saves, and WordPiece /
Unigram tokenizers trained here."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.catalog.builder import _corpus

HIDDEN = 64


def _bert_tokenizer(path: Path) -> int:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials)
    tok.train_from_iterator(_corpus(7), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    BertTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))
    return int(tok.get_vocab_size())


def _roberta_tokenizer(path: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # pad is 1, as XLM-RoBERTa's
    trainer = trainers.UnigramTrainer(vocab_size=500, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(_corpus(8), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    XLMRobertaTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))
    return int(tok.get_vocab_size())


def build_encoder(
    path: Path,
    family: str,
    architecture: str,
    seed: int,
    labels: int = 1,
    hidden: int = HIDDEN,
    layers: int = 2,
) -> None:
    """An encoder of `family` ("bert" or "xlm-roberta") saved as transformers saves
    `architecture` (BertModel, BertForSequenceClassification, ...): 2 layers of 64 by default;
    the benchmark's is MiniLM-L6's shape (6 layers of 384)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_embeddings.models import bert, xlm_roberta

    path.mkdir(parents=True, exist_ok=True)
    roberta = family == "xlm-roberta"
    vocab = (_roberta_tokenizer if roberta else _bert_tokenizer)(path)
    config = {
        "architectures": [architecture],
        "model_type": family,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 16 if hidden <= 64 else hidden // 32,
        "intermediate_size": 2 * hidden if hidden <= 64 else 4 * hidden,
        "max_position_embeddings": 130 if roberta else 128,
        "type_vocab_size": 1 if roberta else 2,
        "layer_norm_eps": 1e-5 if roberta else 1e-12,
        "pad_token_id": 1 if roberta else 0,
        "id2label": {str(i): f"LABEL_{i}" for i in range(labels)},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    module = xlm_roberta if roberta else bert
    encoder = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(encoder.parameters()))
    if architecture.endswith("ForSequenceClassification"):
        # transformers' names: the encoder under the family's name, then the head.
        prefix = "roberta." if roberta else "bert."
        # (RoBERTa's classifier has no pooler: its head reads the [CLS] state itself.)
        kept = {k: v for k, v in weights.items() if not (roberta and k.startswith("pooler."))}
        weights = {prefix + k: v for k, v in kept.items()}
        scale = 1 / hidden**0.5
        if roberta:
            weights["classifier.dense.weight"] = mx.random.normal((hidden, hidden)) * scale
            weights["classifier.dense.bias"] = mx.zeros((hidden,))
            weights["classifier.out_proj.weight"] = mx.random.normal((labels, hidden)) * scale
            weights["classifier.out_proj.bias"] = mx.zeros((labels,))
        else:
            weights["classifier.weight"] = mx.random.normal((labels, hidden)) * scale
            weights["classifier.bias"] = mx.zeros((labels,))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})


def build_modernbert(path: Path, architecture: str, seed: int) -> None:
    """A 3-layer ModernBERT (global and local attention layers) saved as `architecture`;
    its classifier, for ModernBertForSequenceClassification, is mlx-embeddings' own."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_embeddings.models import modernbert

    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [architecture],
        "model_type": "modernbert",
        "vocab_size": _bert_tokenizer(path),
        "hidden_size": HIDDEN,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "local_attention": 16,
        "classifier_pooling": "mean",
        "id2label": {"0": "LABEL_0"},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    model = modernbert.Model(modernbert.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
