"""A tiny model with a long context that answers every chat with the same words, at any
temperature: for the real agent CLIs (Claude Code, Codex), whose system prompts are 30-80 KB and
which sample at temperature 1, where a random model would ramble until its context is full.

No training: the weights are set by hand. Every layer's output projections are zero, so the
residual stream at a position is its token's embedding, and the model is a bigram table. Each
embedding has a 1 in dimension 0; the token that ends the chat template's generation prompt and
each word of the answer have a 1 in a dimension of their own; the output rows map those
dimensions to the next word, and dimension 0 to end-of-sequence. The margins (~28 logits) make
sampling deterministic. Attention and the MLP still run, so prefill costs what it would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.catalog.builder import CHAT_TEMPLATE, EOS_TOKEN_ID, ModelSpec, build_model

ANSWER = "Hello from mlx-manager."
DATA = Path(__file__).parent / "data"
# One layer with one small head: this CPU's MLX computes a long prompt's attention slowly, and a
# real agent's first request is 10-20 thousand tokens even with the tokenizer below.
SPEC = ModelSpec(
    hidden_size=16,
    num_hidden_layers=1,
    intermediate_size=32,
    num_attention_heads=1,
    num_key_value_heads=1,
    vocab_size=8192,
    max_position_embeddings=131072,
    seed=11,
    description="hand-set weights: it answers every chat with the same words",
)


def agent_texts() -> tuple[str, ...]:
    """The strings of the agents' recorded requests (tests/data): the tokenizer learns their
    words, so that their prompts are few tokens, as with a real model's large vocabulary."""

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                yield from strings(item)

    texts: list[str] = []
    for name in ("claude_code_request.json", "codex_request.json"):
        body = json.loads((DATA / name).read_text())["body"]
        texts += strings(body)
        texts.append(json.dumps(body.get("tools")))
    return tuple(texts)


def build_scripted_model(path: Path, answer: str = ANSWER) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    build_model(path, SPEC, texts=(answer, *agent_texts()))
    model, tokenizer = load(str(path))[:2]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in ("hi", "a longer question, with words.")
    ]
    end = {p[-1] for p in prompts}
    assert len(end) == 1, f"the generation prompt ends in different tokens: {end}"
    chain = [end.pop(), *tokenizer.encode(answer, add_special_tokens=False)]
    assert len(set(chain)) == len(chain), f"a token repeats in {chain}: choose other words"
    assert len(chain) + 1 < SPEC.hidden_size

    hidden, vocab = SPEC.hidden_size, SPEC.vocab_size
    embed = [[0.0] * hidden for _ in range(vocab)]
    head = [[0.0] * hidden for _ in range(vocab)]
    for row in embed:
        row[0] = 1.0
    for i, token in enumerate(chain):
        embed[token][i + 1] = 1.0
        following = chain[i + 1] if i + 1 < len(chain) else EOS_TOKEN_ID
        head[following][i + 1] = 10.0
    head[EOS_TOKEN_ID][0] = 5.0  # any other token: end

    weights = dict(tree_flatten(model.parameters()))
    weights["model.embed_tokens.weight"] = mx.array(embed)
    weights["lm_head.weight"] = mx.array(head)
    for name, value in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = mx.zeros_like(value)
        elif name.endswith("norm.weight"):
            weights[name] = mx.ones_like(value)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


__all__ = ["ANSWER", "CHAT_TEMPLATE", "build_scripted_model"]
