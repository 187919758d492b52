"""Agent turns benchmark (not a test): a Claude-Code-shaped conversation through /v1/messages
(a ~40 KB system prompt and tools taken from Claude Code's recorded request, then one user
message), turn 1 and then turn 2 (its answer and one more user message appended), against a
cold prefill of about as many tokens as turn 2 adds. With the prompt cache, turn 2 should reach
its first token in about the time the new tokens alone take, not in turn 1's time.

Each round starts a conversation no cache has seen (a round number opens the system prompt).
The model is a two-layer llama with random weights, a template that shows the tools, and a
tokenizer trained once on the agents' prompts (so 40 KB is about 9K tokens): on this CPU its
prefill cost is attention's, as with a real model.

    .venv/bin/python bench/bench_agent_turns.py [--rounds 3] [--system-kb 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anthropic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.catalog.builder import CHAT_TEMPLATE, ModelSpec, build_model  # noqa: E402
from tests.scripted_model import DATA, agent_texts  # noqa: E402
from tests.server import start_server  # noqa: E402

# The tools go into the prompt as JSON, as real templates put them (the builder's plain template
# shows none, and a template that shows no tools is not given them).
TEMPLATE = "{% if tools %}<|system|>\nTools: {{ tools | tojson }}</s>\n{% endif %}" + CHAT_TEMPLATE
SPEC = ModelSpec(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=8192,
    max_position_embeddings=65536,
    seed=5,
)


def claude_code_prompt(kb: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Claude Code's system blocks and as many of its tools as fit in `kb` KB, together."""
    body = json.loads((DATA / "claude_code_request.json").read_text())["body"]
    system = body["system"]
    size = len(json.dumps(system))
    tools = []
    for tool in body["tools"]:
        size += len(json.dumps(tool))
        if size > kb * 1024:
            break
        tools.append(tool)
    return system, tools


def ttft(client: anthropic.Anthropic, **kwargs: Any) -> tuple[float, str, Any]:
    """Seconds to the first generated event (a delta, or the end if the first token ends the
    answer), the answer's text, and the usage."""
    started = time.perf_counter()
    first = None
    # This SDK takes no temperature argument any more; the API still does.
    greedy = {"extra_body": {"temperature": 0}}
    with client.messages.stream(model="bench", max_tokens=8, **greedy, **kwargs) as stream:
        for event in stream:
            if first is None and event.type in ("content_block_delta", "message_delta"):
                first = time.perf_counter() - started
        message = stream.get_final_message()
    text = "".join(b.text for b in message.content if b.type == "text")
    return first or 0.0, text, message.usage


def filler(client: anthropic.Anthropic, tag: str, tokens: int) -> list[dict[str, Any]]:
    """A user message of about `tokens` prompt tokens (count_tokens calibrates it), unlike
    any other prompt of the run."""
    words = tokens
    for _ in range(3):
        messages = [{"role": "user", "content": " ".join(f"{tag}w{i}" for i in range(words))}]
        counted = client.messages.count_tokens(model="bench", messages=messages).input_tokens
        if abs(counted - tokens) <= max(2, tokens // 20):
            break
        words = max(1, round(words * tokens / counted))
    return messages


def in_process(path: Path, cached: int, new: int, repeats: int = 5) -> float:
    """The floor for turn 2: the same model in this process prefilling `new` tokens on top of
    a KV cache of `cached` tokens and sampling one (median of `repeats`)."""
    import copy

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model = load(str(path))[0]
    cache = make_prompt_cache(model)
    prefix = mx.array([[i % 4000 + 10 for i in range(cached)]])
    for i in range(0, cached, 2048):
        model(prefix[:, i : i + 2048], cache=cache)
        mx.eval([c.state for c in cache])
    times = []
    for _ in range(repeats):
        fresh = copy.deepcopy(cache)
        started = time.perf_counter()
        logits = model(mx.array([[i + 20 for i in range(new)]]), cache=fresh)
        mx.eval(mx.argmax(logits[:, -1, :], axis=-1))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--system-kb", type=int, default=40)
    args = ap.parse_args()
    system, tools = claude_code_prompt(args.system_kb)
    kb = len(json.dumps(system)) + len(json.dumps(tools))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The agents' words train the tokenizer once, not fifty times: it then splits their
        # prompts about as a real model's tokenizer does (4-5 characters a token).
        build_model(
            root / "models" / "bench", SPEC, chat_template=TEMPLATE, texts=agent_texts(), repeat=1
        )
        (root / "hf").mkdir()
        env = {
            "MLX_MANAGER_MODEL_DIRS": str(root / "models"),
            "HF_HUB_CACHE": str(root / "hf"),
            "MLX_MANAGER_WARM_SPARE": "0",
        }
        server = start_server(root / "home", env)
        try:
            client = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=900)
            ttft(client, messages=[{"role": "user", "content": "warm up"}])  # load the model
            rows = []
            for r in range(args.rounds):
                # A round no cache has seen: the template puts the tools first.
                opened = [{"type": "text", "text": f"Round {r}."}, *system]
                first = {**tools[0], "description": f"Round {r}. {tools[0].get('description', '')}"}
                round_tools = [first, *tools[1:]]
                turn1 = [{"role": "user", "content": "List the files in this folder."}]
                t1, answer, u1 = ttft(client, system=opened, tools=round_tools, messages=turn1)
                turn2 = [
                    *turn1,
                    {"role": "assistant", "content": answer or "ok"},
                    {"role": "user", "content": "Now show me the largest one, please."},
                ]
                t2, _, u2 = ttft(client, system=opened, tools=round_tools, messages=turn2)
                cached = u2.cache_read_input_tokens or 0
                new_tokens = u2.input_tokens  # Anthropic's input_tokens: those not read from cache
                # A cold prompt of about as many tokens as turn 2 added (round-unique, uncached).
                cold_turn = filler(client, f"r{r}", new_tokens)
                cold, _, u3 = ttft(client, messages=cold_turn)
                rows.append((t1, t2, cold, u1, u2, u3, cached, new_tokens))
                print(
                    f"round {r}: turn 1 {t1:.3f} s ({u1.input_tokens} tokens), turn 2 {t2:.3f} s "
                    f"({cached} cached + {new_tokens} new), cold {u3.input_tokens} tokens "
                    f"{cold:.3f} s",
                    flush=True,
                )
        finally:
            server.stop()
        floor = in_process(root / "models" / "bench", rows[-1][6], rows[-1][7])
    t1 = statistics.median(r[0] for r in rows)
    t2 = statistics.median(r[1] for r in rows)
    cold = statistics.median(r[2] for r in rows)
    print(f"\nsystem prompt and tools: {kb / 1024:.0f} KB; medians of {args.rounds} rounds")
    print(f"turn 1 TTFT            {t1:8.3f} s")
    print(f"turn 2 TTFT            {t2:8.3f} s   ({t2 / t1:.3f} of turn 1)")
    print(f"cold new tokens alone  {cold:8.3f} s   (turn 2 / cold: {t2 / cold:.2f})")
    print(
        f"in-process: {rows[-1][7]} new tokens atop a {rows[-1][6]}-token KV cache, then one "
        f"token: {floor:.3f} s (turn 2 / that: {t2 / floor:.2f})"
    )


if __name__ == "__main__":
    main()
