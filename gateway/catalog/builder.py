"""Build small real mlx-lm models with random weights, entirely offline.

Used for the offline demo model that `serve` offers when no model is present, for the test
fixtures and for the benchmarks. The result is an ordinary model folder (config.json, tokenizer
files with a chat template, model.safetensors) that `mlx_lm.load` reads like any other.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

EOS_TOKEN_ID = 2  # "</s>": the third special token the tokenizer trainer is given

_WORDS = (
    "the a model answers questions about local machines memory tokens weights random "
    "hello world apple silicon gateway worker process batch stream cache profile load "
    "unload quick brown fox jumps over lazy dog one two three four five six seven eight "
    "nine ten red green blue yellow data server client request response python code"
).split()


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a tiny llama; the defaults make a ~1M-parameter model that loads in milliseconds."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    seed: int = 0
    description: str = "random weights: its output is meaningless"


BENCH_SPEC = ModelSpec(
    hidden_size=384,
    num_hidden_layers=6,
    intermediate_size=1024,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=8192,
    max_position_embeddings=4096,
)  # ~16M parameters (the issue asked for about 20M)


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + rng.choice(".?!")
        for _ in range(lines)
    ]


def build_tokenizer(
    path: Path,
    vocab_size: int,
    seed: int = 0,
    special_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
    texts: tuple[str, ...] = (),
    repeat: int = 50,
) -> None:
    """Train a byte-level BPE tokenizer and save it with a chat template. `texts` join the
    training corpus `repeat` times (often, so that they become few tokens; once, for a
    tokenizer that splits them as a real one splits prose)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed) + list(texts) * repeat, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    fast.save_pretrained(str(path))


def build_model(
    path: str | Path,
    spec: ModelSpec = ModelSpec(),
    special_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
    texts: tuple[str, ...] = (),
    repeat: int = 50,
) -> Path:
    """Write a llama model with random weights and a trained tokenizer to `path` (extra
    special tokens such as `<think>`, the chat template and extra corpus are the
    tokenizer's)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path, spec.vocab_size, spec.seed, special_tokens, chat_template, texts, repeat)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": EOS_TOKEN_ID,
        "torch_dtype": "float32",
    }
    mx.random.seed(spec.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "README.md").write_text(
        f"# {path.name}\n\nBuilt locally by mlx-manager. This model has {spec.description}.\n"
    )
    return path
