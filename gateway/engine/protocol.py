"""The messages between the gateway and a worker process, defined once.

The gateway sends `Load`, then `Generate`, `Embed` and `Cancel` as requests come and go, and
`Stop`. The worker answers `Warm` (its imports are done), `Ready` or `LoadFailed`, a
`Heartbeat` every second from a thread of its own, and one list of events per decode step:
what each sequence produced (`Started`, `Text`, `Reasoning`, `ToolCallStart`, `ToolCallArgs`,
`Finished`, `Failed`), an `Embedded` answer to an `Embed` (or a `Failed`), and now and then an
`Activity` report. NamedTuples: as cheap to pickle as plain tuples, and read by name
everywhere.

An event's `seq` is the request id on the pipe; the pool's stream replaces it with the choice's
index before anyone else sees the event, so the same types are the service's output events.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# Gateway -> worker -----------------------------------------------------------------------------


class Load(NamedTuple):
    path: str
    options: dict[str, Any]


class Generate(NamedTuple):
    rid: str
    request: dict[str, Any]  # GenerationRequest.payload()


class Embed(NamedTuple):
    """Vectors for some inputs (or a reranker's scores: vectors of one), computed whole
    between two decode steps."""

    rid: str
    request: dict[str, Any]  # EmbeddingRequest.payload() or RerankRequest.payload()


class Cancel(NamedTuple):
    rid: str


class Stop(NamedTuple):
    pass


# Worker -> gateway -----------------------------------------------------------------------------


class Warm(NamedTuple):
    pid: int


class Ready(NamedTuple):
    info: dict[str, Any]  # pid, load_seconds, memory_bytes, context_length


class LoadFailed(NamedTuple):
    error: str
    traceback: str


class Heartbeat(NamedTuple):
    pass


class Activity(NamedTuple):
    """Sequences running, tokens made so far, and MLX's memory (what the budget counts)."""

    active: int
    generated: int
    memory_bytes: int


# One sequence's events (a list of them per decode step) ----------------------------------------


class Logprob(NamedTuple):
    token: str
    logprob: float
    top: list[tuple[str, float]]


class Started(NamedTuple):
    """The prompt was accepted: its length, and how much of it came from the prompt cache."""

    seq: Any
    prompt_tokens: int
    cached_tokens: int


class Text(NamedTuple):
    """One token's content text; `logprob` only when asked for."""

    seq: Any
    text: str
    logprob: Logprob | None


class Reasoning(NamedTuple):
    seq: Any
    text: str


class ToolCallStart(NamedTuple):
    seq: Any
    call_id: str
    name: str


class ToolCallArgs(NamedTuple):
    """More of the current call's arguments (JSON text), as they are written."""

    seq: Any
    text: str


class Finished(NamedTuple):
    seq: Any
    reason: str  # stop | length | tool_calls
    completion_tokens: int
    reasoning_tokens: int = 0  # of completion_tokens, those that went to reasoning
    stop_sequence: str | None = None  # the request's stop string that ended it (reason stop)


class Failed(NamedTuple):
    seq: Any
    kind: str  # the name of a gateway.errors class
    message: str


class Embedded(NamedTuple):
    """An Embed's answer: one float32 vector per input (little-endian, `dim` each, in the
    order given, as one buffer: a vector costs its bytes on the pipe, not a list of floats),
    and each input's tokens."""

    seq: Any
    vectors: bytes
    dim: int
    tokens: list[int]


Event = Started | Text | Reasoning | ToolCallStart | ToolCallArgs | Finished | Failed | Embedded
# What a stream yields: everything but Started, which the stream keeps as usage.
Output = Text | Reasoning | ToolCallStart | ToolCallArgs | Finished
