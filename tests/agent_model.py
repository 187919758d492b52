"""A tiny model overfit on purpose so that it says known things: random weights never emit a
tool call or a think block, so tests of those need a model trained to.

The tokenizer has `<think>`, `</think>`, `<tool_call>` and `</tool_call>` as special tokens and
a chat template in the Qwen style (tools, assistant tool calls, `tool` messages, and Qwen3's
thinking switch: `enable_thinking` false puts an empty think block after the generation
prompt). mlx-lm infers
the `json_tools` tool parser and the think markers from them, as it does for real models. The
model is trained, with mlx, on each scenario's exact prompt (rendered by that template from the
messages the tests send) until greedy decoding reproduces every answer. The trained weights are
cached on disk (CACHE), keyed on everything the training reads, so later runs skip it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.catalog.builder import EOS_TOKEN_ID, ModelSpec, build_model

AGENT_TEMPLATE = (
    "{%- if tools %}<|system|>\nTools:{% for tool in tools %} {{ tool.function.name }}"
    "{% endfor %}</s>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|assistant|>\n"
    "{{ message.content }}{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": '
    "{{ tool_call.arguments | tojson }}}</tool_call>{% endfor %}</s>\n"
    "{%- else %}<|{{ message.role }}|>\n{{ message.content }}</s>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# The template without its thinking switch: a model that thinks but cannot be told not to.
SWITCHLESS_TEMPLATE = AGENT_TEMPLATE.replace(
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}",
    "",
)
SPECIAL = ("<think>", "</think>", "<tool_call>", "</tool_call>")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]

ASK_WEATHER = [{"role": "user", "content": "weather in Paris?"}]
ASK_TWO = [{"role": "user", "content": "weather in Paris and Rome?"}]
ASK_BROKEN = [{"role": "user", "content": "break the tool"}]
ASK_THINK = [{"role": "user", "content": "think first"}]
CALL_ID = "call_0"
# The tool loop's second turn: the call, then the tool's answer.
TOOL_RESULT = [
    *ASK_WEATHER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21C"},
]

CALL_PARIS = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CALL_ROME = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
BROKEN_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
FINAL_ANSWER = "It is sunny in Paris."
THOUGHT = "The user wants a plan."
THINK_ANSWER = "Here is the plan."

# (messages as the tests send them, tools or None, template variables, what the model must
# answer)
Scenario = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any], str]
SCENARIOS: list[Scenario] = [
    (ASK_WEATHER, TOOLS, {}, CALL_PARIS),
    (ASK_TWO, TOOLS, {}, CALL_PARIS + CALL_ROME),
    (ASK_BROKEN, TOOLS, {}, BROKEN_CALL),
    (TOOL_RESULT, TOOLS, {}, FINAL_ANSWER),
    (ASK_THINK, None, {}, f"<think>{THOUGHT}</think>{THINK_ANSWER}"),
    # Thinking off: the prompt ends with an empty think block, and the answer follows.
    (ASK_THINK, None, {"enable_thinking": False}, THINK_ANSWER),
]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the gateway hands them to a chat template (gateway/http/schemas.py)."""
    from gateway.http.schemas import Message

    return [Message.model_validate(m).as_template_message() for m in messages]


# Trained weights are kept here between test runs, named by a hash of everything training
# reads (this file, the untrained model folder, the token rows, the mlx versions).
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-manager-tests"


def build_agent_model(path: Path, max_steps: int = 1000, cache: Path | None = CACHE) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load

    spec = ModelSpec(seed=7, description="weights overfit on a few fixed answers")
    # The answers and tool JSON join the tokenizer's corpus, so that they are few tokens: on
    # this CPU's reference BLAS a training step costs about its token count.
    texts = tuple(s[3] for s in SCENARIOS) + tuple(json.dumps(t) for t in TOOLS)
    texts += tuple(m["content"] for s in SCENARIOS for m in s[0] if m.get("content"))
    build_model(path, spec, SPECIAL, AGENT_TEMPLATE, texts)
    model, tokenizer = load(str(path))

    rows, masks = [], []
    for messages, tools, variables, answer in SCENARIOS:
        extra = {"tools": tools, **variables} if tools else variables
        prompt = tokenizer.apply_chat_template(
            template_messages(messages), add_generation_prompt=True, **extra
        )
        target = tokenizer.encode(answer, add_special_tokens=False) + [EOS_TOKEN_ID]
        rows.append(list(prompt) + target)
        masks.append([0] * len(prompt) + [1] * len(target))
    width = max(map(len, rows))
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows])
    mask = mx.array([m + [0] * (width - len(m)) for m in masks], dtype=mx.float32)
    weights_file = path / "model.safetensors"
    cached = cache / f"agent-{_cache_key(path, rows, masks)}.safetensors" if cache else None
    if cached is not None and cached.exists() and _load_checked(model, cached, tokens, mask):
        weights_file.write_bytes(cached.read_bytes())
        return path

    def loss_fn(model: Any) -> Any:
        logits = model(tokens[:, :-1])
        losses = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
        weights = mask[:, 1:]
        return (losses * weights).sum() / weights.sum()

    optimizer = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(model, loss_fn)
    started = time.perf_counter()
    for i in range(max_steps):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        # Checked often once it may be done: a check costs about a third of a step.
        if i % 5 == 4 and i >= 19 and _all_greedy_right(model, tokens, mask):
            break
    else:
        raise RuntimeError(f"the agent model did not learn its answers (loss {loss.item():.4f})")
    mx.save_safetensors(str(weights_file), dict(tree_flatten(model.parameters())))
    print(f"agent model: {i + 1} steps, {time.perf_counter() - started:.1f} s, {tokens.shape}")
    if cached is not None:
        _store(weights_file, cached)
    return path


def _cache_key(path: Path, rows: list[list[int]], masks: list[list[int]]) -> str:
    import mlx.core as mx
    import mlx_lm

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{mx.__version__} {mlx_lm.__version__}".encode())
    for file in sorted(path.iterdir()):  # untrained weights, config, tokenizer, template
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    digest.update(json.dumps([rows, masks]).encode())
    return digest.hexdigest()[:32]


def _load_checked(model: Any, cached: Path, tokens: Any, mask: Any) -> bool:
    """Cached weights, checked as training checks itself: a bad entry is retrained, not used."""
    try:
        model.load_weights(str(cached))
    except Exception:  # noqa: BLE001 - unreadable or truncated: train instead
        return False
    return _all_greedy_right(model, tokens, mask)


def _store(weights_file: Path, cached: Path) -> None:
    """Copy into the cache atomically: a concurrent or interrupted run never sees half a file."""
    tmp = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(weights_file.read_bytes())
        os.replace(tmp, cached)
    except OSError as e:  # a read-only home only costs the next run its training
        print(f"agent model: not cached ({e})")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _all_greedy_right(model: Any, tokens: Any, mask: Any) -> bool:
    """Teacher-forced greedy check: every answer token is the argmax at its position (which
    is what greedy decoding then reproduces, token by token)."""
    import mlx.core as mx

    predicted = mx.argmax(model(tokens[:, :-1]), axis=-1)
    wanted = mask[:, 1:] > 0
    return bool(mx.all(mx.where(wanted, predicted == tokens[:, 1:], True)).item())
