"""What one generation request cost: the value the engine's stream keeps, the service returns,
the faces report and the request log and metrics record."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Usage:
    """What one request cost. A prompt counts once however many choices it has."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, reused from the prompt cache
    reasoning_tokens: int = 0  # of completion_tokens
    first_token: float | None = None  # perf_counter when the first output arrived
    # perf_counter when a worker took the request (after any wait for its model to load), and
    # the seconds waited before that: Ollama's load_duration and prompt_eval_duration.
    started: float | None = None
    load_seconds: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
