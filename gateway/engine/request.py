"""What one choice of a generation asks of a worker (`GenerationRequest`, sent as a plain dict:
its payload), and a finished choice (`Choice`). The events a worker answers with are in
gateway/engine/protocol.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from gateway.engine.protocol import Logprob

OPENAI_DEFAULT_TEMPERATURE = 1.0
OPENAI_DEFAULT_TOP_P = 1.0


# OpenAI's reasoning efforts as a thinking switch and a budget of reasoning tokens (Responses'
# `reasoning.effort`, Chat Completions' `reasoning_effort`): "none" turns thinking off, "high"
# leaves it unbounded.
EFFORT_BUDGETS: dict[str, int | None] = {
    "minimal": 256,
    "low": 1024,
    "medium": 4096,
    "high": None,
    "xhigh": None,
    "max": None,
}


def effort(name: str | None) -> tuple[bool | None, int | None]:
    """(thinking, reasoning_budget) for a reasoning effort; (None, None) when none was given."""
    if name is None:
        return None, None
    if name == "none":
        return False, None
    return True, EFFORT_BUDGETS.get(name)


@dataclass
class GenerationRequest:
    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # sample among the k likeliest tokens only (Anthropic's top_k)
    min_p: float | None = None  # drop tokens below min_p times the likeliest one's probability
    repetition_penalty: float | None = None  # divides the logits of recent tokens (1: none)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    context_length: int | None = None  # a profile may cap the model's own
    tools: list[dict[str, Any]] | None = None  # passed to the chat template
    tool_choice: str | None = None  # "auto" or "required" (with tools)
    parallel_tool_calls: bool = True
    reasoning: str | None = None  # "separate" | "inline"; None: the profile's, else separate
    tool_parser: str | None = None  # an mlx-lm tool parser module; None: the tokenizer's
    grammar: str | None = None  # llguidance grammar the output must follow (response_format)
    tool_grammar: str | None = None  # what a JSON tool call may be, once the model opens one
    ignore_eos: bool = False  # run to max_tokens even past end-of-sequence (benchmarks)
    # Extra variables for the chat template (vLLM's `chat_template_kwargs`).
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Thinking on (True) or off (False), through the model's own switch where its template has
    # one; None: the profile's choice, else the model's default.
    thinking: bool | None = None
    reasoning_budget: int | None = None  # most reasoning tokens; then the think block closes
    count_only: bool = False  # build and count the prompt, generate nothing (count_tokens)
    # A max_tokens over the server's limit is cut to it rather than refused: Anthropic's
    # clients send what Claude allows (Claude Code: 32000), whatever this server's limit is.
    clamp_max_tokens: bool = False

    def with_defaults(
        self, profile: dict[str, Any] | None, default_max_tokens: int | None
    ) -> GenerationRequest:
        """Fill what the request left unset: the profile's value, else OpenAI's default."""
        p = profile or {}

        def pick(value: Any, key: str, default: Any) -> Any:
            if value is not None:
                return value
            return p[key] if p.get(key) is not None else default

        messages = self.messages
        if self.kind == "chat" and p.get("system_prompt") and messages is not None:
            if not any(m.get("role") in ("system", "developer") for m in messages):
                messages = [{"role": "system", "content": p["system_prompt"]}, *messages]
        return replace(
            self,
            messages=messages,
            temperature=pick(self.temperature, "temperature", OPENAI_DEFAULT_TEMPERATURE),
            top_p=pick(self.top_p, "top_p", OPENAI_DEFAULT_TOP_P),
            max_tokens=pick(self.max_tokens, "max_tokens", default_max_tokens),
            context_length=pick(self.context_length, "context_length", None),
            reasoning=pick(self.reasoning, "reasoning_format", "separate"),
            tool_parser=pick(self.tool_parser, "tool_parser", None),
            thinking=pick(self.thinking, "thinking", None),
            reasoning_budget=pick(self.reasoning_budget, "reasoning_budget", None),
        )

    def payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateRequest:
    """What every face asks of the service's one generation path, whatever its protocol."""

    model: str  # any name a request may use
    choices: list[GenerationRequest]  # one per choice: prompts in order, `n` each
    n: int = 1  # choices per prompt (usage counts each prompt once)
    keep_alive: float | None = None
    stream: bool = False
    # What was asked (messages or prompt), for the request log when it keeps content: a
    # function, so that the common case (it does not) costs nothing.
    content: Callable[[], Any] | None = None


@dataclass
class Choice:
    """One finished choice of a non-streamed generation."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    reasoning: str = ""
    tool_calls: list[list[str]] = field(default_factory=list)  # [id, name, arguments]
    stop_sequence: str | None = None  # the stop string that ended it, if one did


Pooling = Literal["last", "mean", "cls"]


@dataclass
class EmbeddingRequest:
    """What every face asks of the service's one embedding path: vectors for some inputs."""

    model: str  # any name a request may use
    inputs: list[str | list[int]]  # texts, or token ids as they are
    pooling: Pooling | None = None  # None: the profile's, else the model's default
    normalize: bool = True  # L2-normalised vectors (OpenAI's are)
    dimensions: int | None = None  # keep the first this many, then normalise again
    # An input longer than the context is cut to it (Ollama's `truncate`) instead of refused.
    truncate: bool = False
    keep_alive: float | None = None
    content: Callable[[], Any] | None = None  # for the request log, as GenerateRequest's

    def payload(self, pooling: Pooling, context_length: int | None) -> dict[str, Any]:
        """What the worker is sent: the inputs and how to pool them, with the profile's
        pooling and context cap applied."""
        return {
            "inputs": self.inputs,
            "pooling": pooling,
            "normalize": self.normalize,
            "dimensions": self.dimensions,
            "truncate": self.truncate,
            "context_length": context_length,
        }


@dataclass
class Embeddings:
    """An embedding request's answer: one vector per input, in order."""

    vectors: bytes  # float32, little-endian, `dim` per input
    dim: int
    tokens: list[int]  # each input's tokens
    load_seconds: float = 0.0  # waited for the model's worker (its load)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)

    def floats(self) -> list[list[float]]:
        import numpy as np

        rows: list[list[float]] = np.frombuffer(self.vectors, "<f4").reshape(-1, self.dim).tolist()
        return rows

    def base64(self) -> list[str]:
        """Each vector's float32 bytes in base64, as OpenAI's `encoding_format: base64`."""
        import base64

        size = 4 * self.dim
        data = self.vectors
        return [base64.b64encode(data[i : i + size]).decode() for i in range(0, len(data), size)]


@dataclass
class RerankRequest:
    """What every face asks of the service's one rerank path: documents scored for a query."""

    model: str
    query: str
    documents: list[str]
    instruction: str | None = None  # the reranker's task description; None: web search
    keep_alive: float | None = None
    content: Callable[[], Any] | None = None

    def payload(self, context_length: int | None) -> dict[str, Any]:
        return {
            "task": "rerank",
            "query": self.query,
            "documents": self.documents,
            "instruction": self.instruction,
            "context_length": context_length,
        }


@dataclass
class Ranking:
    """A rerank request's answer: each document's relevance (0-1), in the order given."""

    scores: list[float]
    tokens: list[int]  # each (query, document) pair's tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)
