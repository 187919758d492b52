"""Models on disk: the Hugging Face cache and the configured model folders.

The remote half (search, download, delete) arrives with the hub issue; this module already owns
finding local models and reading what they are from their config.json.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LocalModel:
    id: str
    path: Path
    source: str  # "hf-cache" or "folder"
    size_bytes: int  # every file of the model
    weights_bytes: int  # the *.safetensors files: what loading puts in memory
    created: int
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    description: str | None = None
    # The folder's real path: what identifies the model, however its path is spelled.
    key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.key = self.key or os.path.realpath(self.path)

    @property
    def context_length(self) -> int | None:
        return context_length_of(self.config)

    @property
    def family(self) -> str | None:
        return self.config.get("model_type")

    @property
    def kind(self) -> str:
        kind = model_kind(self.config)
        if kind == "chat":  # a language model trained for one job says so in its name
            name = self.id.rsplit("/", 1)[-1].lower()
            if "reranker" in name:
                return "reranker"  # Qwen3-Reranker
            if "embedding" in name:
                return "embedding"  # Qwen3-Embedding
        return kind

    @property
    def encoder(self) -> bool:
        return is_encoder(self.config)

    @property
    def quantization_bits(self) -> int | None:
        q = self.config.get("quantization") or self.config.get("quantization_config") or {}
        return q.get("bits") if isinstance(q, dict) else None


# Encoder families (BERT and its descendants): embedding models, not language models.
_ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "modernbert", "nomic_bert", "distilbert", "electra"}
)


def model_kind(config: dict[str, Any]) -> str:
    """What a model serves, from its config.json: "reranker" (a sequence classifier: a
    cross-encoder), "embedding" (an encoder: BERT, XLM-RoBERTa, ModernBERT...) or "chat" (a
    language model, which can also embed by pooling its hidden states)."""
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "reranker"
    if is_encoder(config):
        return "embedding"
    return "chat"


def is_encoder(config: dict[str, Any]) -> bool:
    """Is this a BERT-family encoder (served through mlx-embeddings), not a language model?"""
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    return config.get("model_type") in _ENCODER_TYPES or any(
        a.endswith("ForMaskedLM") or a in ("BertModel", "XLMRobertaModel", "ModernBertModel")
        for a in architectures
    )


def encoder_context(config: dict[str, Any]) -> int:
    """Tokens an encoder reads at once. RoBERTa's positions start after its padding index,
    so XLM-RoBERTa's 514 positions hold 512 tokens."""
    positions = context_length_of(config) or 512
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        positions -= int(config.get("pad_token_id", 1)) + 1
    return positions


def declared_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers model declares (1_Pooling/config.json): "cls",
    "mean" or "last"; None when it declares none."""
    try:
        modes = json.loads((path / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key, pooling in (
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_lasttoken", "last"),
        ("pooling_mode_mean_tokens", "mean"),
    ):
        if modes.get(key) is True:
            return pooling
    return None


def context_length_of(config: dict[str, Any]) -> int | None:
    """The context window a model's config.json declares (names differ by architecture)."""
    cfg = config.get("text_config", config)
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


# The single-token think markers mlx-lm looks for in a vocabulary, in its order
# (mlx_lm.tokenizer_utils._infer_thinking).
_THINK_TOKENS = (
    ("<think>", "</think>"),
    ("<longcat_think>", "</longcat_think>"),
    ("<|think:start|>", "<|think:end|>"),
)


def think_markers(path: Path) -> tuple[str, str] | None:
    """The markers around a model's reasoning, inferred from its vocabulary the way mlx-lm
    infers them; None when it has none. The one answer to "does this model reason": the
    worker splits reasoning at these markers, and model inspection reports them, without
    loading the tokenizer (the gateway never imports MLX or transformers for it)."""
    vocab = _vocabulary(path)
    for start, end in _THINK_TOKENS:
        if start in vocab and end in vocab:
            return start, end
    if "<|channel>" in vocab and "<channel|>" in vocab:
        return "<|channel>thought", "<channel|>"
    if all(t in vocab for t in ("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>")):
        return "<|open|>think<|sep|>", "<|close|>think<|sep|>"
    return None


def template_text(template: Any) -> str:
    """A chat template's source, however the tokenizer holds it: one string, a dict of named
    templates, or tokenizer_config.json's list of {name, template}."""
    if isinstance(template, str):
        return template
    if isinstance(template, dict):
        return "\n".join(t for t in template.values() if isinstance(t, str))
    if isinstance(template, list):
        return "\n".join(str(t.get("template") or "") for t in template if isinstance(t, dict))
    return ""


# A bare `thinking` variable inside a Jinja tag (DeepSeek-V3.1's switch): not `.thinking`,
# `enable_thinking`, or a word of the template's text.
_THINKING_VARIABLE = re.compile(r"{[%{][^}]*(?<![\w.'\"])thinking(?![\w'\"])[^}]*[%}]}")


def thinking_switch(template: str, markers: tuple[str, str] | None) -> str | None:
    """How a model's thinking is turned off: the chat template variable that does it
    (`enable_thinking`: Qwen3, GLM; `thinking`: DeepSeek-V3.1), else "prefix" (the answer
    starts after an empty think block put at the end of the prompt, as Qwen3's template
    does) for a model that has think markers; None for a model that does not think. The one
    answer for model_info and the worker."""
    if "enable_thinking" in template:
        return "enable_thinking"
    if _THINKING_VARIABLE.search(template):
        return "thinking"
    return "prefix" if markers is not None else None


def _vocabulary(path: Path) -> set[str]:
    """Every token string a model's tokenizer files name: tokenizer.json's vocabulary and
    added tokens, tokenizer_config.json's added tokens, added_tokens.json, vocab.json."""

    def read(name: str) -> Any:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError):
            return None

    tokens: set[str] = set()
    tokenizer = read("tokenizer.json")
    if isinstance(tokenizer, dict):
        vocab = (tokenizer.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            tokens.update(vocab)
        elif isinstance(vocab, list):  # Unigram: [token, score] pairs
            tokens.update(v[0] for v in vocab if isinstance(v, list) and v)
        tokens.update(
            str(t.get("content"))
            for t in tokenizer.get("added_tokens") or []
            if isinstance(t, dict)
        )
    config = read("tokenizer_config.json")
    if isinstance(config, dict) and isinstance(config.get("added_tokens_decoder"), dict):
        tokens.update(
            str(t.get("content"))
            for t in config["added_tokens_decoder"].values()
            if isinstance(t, dict)
        )
    for name in ("added_tokens.json", "vocab.json"):
        if isinstance(extra := read(name), dict):
            tokens.update(extra)
    return {t for t in tokens if isinstance(t, str)}


def _read_model_dir(path: Path) -> tuple[dict[str, Any], int, int, int] | None:
    """(config, total bytes, weight bytes, mtime) for a folder that holds a model, else None."""
    try:
        config = json.loads((path / "config.json").read_text())
        entries = list(os.scandir(path))
        mtime = int((path / "config.json").stat().st_mtime)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    # A folder without weights is still listed: the user put it there to serve it, and the load
    # error (503 naming the missing files) tells them more than silence would.
    size = weights = 0
    for entry in entries:
        try:
            st = entry.stat()  # follows the HF cache's symlinks to blobs
        except OSError:
            continue
        size += st.st_size
        if entry.name.endswith(".safetensors"):
            weights += st.st_size
    return config, size, weights, mtime


def _description(path: Path) -> str | None:
    try:
        with (path / "README.md").open(errors="replace") as readme:
            head = readme.read(2000)
    except OSError:
        return None
    if "random weights" in head:
        return "random weights: built offline by mlx-manager, its output is meaningless"
    return None


def scan_hf_cache(cache: Path) -> list[LocalModel]:
    """Models in a Hugging Face hub cache, named `org/name`. A missing cache is simply empty."""
    found: list[LocalModel] = []
    try:
        repos = sorted(p for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError:
        return found
    for repo in repos:
        repo_id = repo.name[len("models--") :].replace("--", "/")
        snapshot = _current_snapshot(repo)
        if snapshot is None:
            continue
        info = _read_model_dir(snapshot)
        if info is None:
            continue
        config, size, weights, mtime = info
        found.append(LocalModel(repo_id, snapshot, "hf-cache", size, weights, mtime, config))
    return found


def _current_snapshot(repo: Path) -> Path | None:
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    try:
        snaps = [s for s in (repo / "snapshots").iterdir() if (s / "config.json").is_file()]
    except OSError:
        return None
    return max(snaps, key=lambda s: s.stat().st_mtime) if snaps else None


def scan_folder(folder: Path) -> list[LocalModel]:
    """Each subfolder holding a config.json is a model named by its folder name."""
    found: list[LocalModel] = []
    try:
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return found
    for sub in subdirs:
        if not (sub / "config.json").is_file():
            continue
        info = _read_model_dir(sub)
        if info is None:
            continue
        config, size, weights, mtime = info
        found.append(
            LocalModel(sub.name, sub, "folder", size, weights, mtime, config, _description(sub))
        )
    return found


def scan_local_models(hf_cache: Path, folders: list[Path]) -> list[LocalModel]:
    """Every local model; on a name clash the HF cache wins, then folders in the order given."""
    by_id: dict[str, LocalModel] = {}
    for model in [*scan_hf_cache(hf_cache), *(m for f in folders for m in scan_folder(f))]:
        by_id.setdefault(model.id, model)
    return list(by_id.values())


def read_local_model(path: Path) -> LocalModel | None:
    """A model named by its path, which the caller has made real (gateway/catalog/names.py): its id
    is that path. None when the folder holds no model or cannot be read."""
    info = _read_model_dir(path)
    if info is None:
        return None
    config, size, weights, mtime = info
    return LocalModel(
        str(path), path, "path", size, weights, mtime, config, _description(path), str(path)
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: tensor names, dtypes and shapes, no weights."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"{path.name}: not a safetensors file")
        return json.loads(f.read(size))


def count_parameters(model: LocalModel) -> int | None:
    """Parameters, counted from tensor shapes; packed quantized weights count as what they
    hold (32 / bits values per uint32), scales and biases of quantization are not counted."""
    bits = model.quantization_bits
    total = 0
    try:
        files = sorted(model.path.glob("*.safetensors"))
        for file in files:
            for name, info in _safetensors_header(file).items():
                if name == "__metadata__":
                    continue
                n = 1
                for dim in info["shape"]:
                    n *= dim
                if bits and name.endswith((".scales", ".biases")):
                    continue
                if bits and info["dtype"] == "U32":
                    n = n * 32 // bits
                total += n
    except (OSError, ValueError, KeyError):
        return None
    return total if files else None


def inspect_model(model: LocalModel) -> dict[str, Any]:
    """What a model is, read from its files without loading it."""
    config = model.config
    q = config.get("quantization") or config.get("quantization_config") or {}
    tokenizer_config: dict[str, Any] = {}
    try:
        tokenizer_config = json.loads((model.path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        pass
    template = template_text(tokenizer_config.get("chat_template"))
    if not template and (model.path / "chat_template.jinja").is_file():
        template = (model.path / "chat_template.jinja").read_text(errors="replace")
    markers = think_markers(model.path)
    text_config = config.get("text_config", config)
    return {
        "id": model.id,
        "path": str(model.path),
        "source": model.source,
        "family": model.family,
        "kind": model.kind,
        "architecture": (config.get("architectures") or [None])[0],
        "parameters": count_parameters(model),
        "quantization": {"bits": q.get("bits"), "group_size": q.get("group_size")}
        if isinstance(q, dict) and q
        else None,
        "context_length": model.context_length,
        "vocab_size": text_config.get("vocab_size"),
        "size_bytes": model.size_bytes,
        "weights_bytes": model.weights_bytes,
        "chat_template": bool(template),
        "tool_calling": "tools" in template,
        "reasoning": markers is not None,
        # How thinking is turned on and off ("enable_thinking", "thinking", "prefix"; None:
        # the model does not think, and requests that ask for thinking or not are answered
        # as they are).
        "thinking_switch": thinking_switch(template, markers),
        "multimodal": any(k in config for k in ("vision_config", "audio_config")),
        "description": model.description,
    }
