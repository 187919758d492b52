"""Logits processors that hold a sequence's output to what it must be: a forced prefix, a
grammar (response_format, or a forced call on a model without a tool-call format), JSON tool
calls once the model opens one, nothing but more calls or the end after a forced call, and the
end of a think block once its budget is spent. Each is a function of (tokens so far, logits)
that rules tokens out; llguidance computes what a grammar allows at each step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Processor = Callable[[Any, Any], Any]


def _keep(logits: Any, allowed: Any) -> Any:
    """`logits` with every token outside `allowed` (a boolean mask) ruled out."""
    import mlx.core as mx

    return mx.where(allowed, logits, -float("inf"))


def _only(tokens: list[int], width: int) -> Any:
    """A mask over `width` logits that allows just `tokens`."""
    import mlx.core as mx
    import numpy as np

    return mx.array(np.isin(np.arange(width), tokens))


def _allowed(matcher: Any, width: int) -> Any:
    """The tokens an llguidance matcher allows next, as a mask over `width` logits (cut or
    padded with False: the model's vocabulary may be padded beyond the tokenizer's)."""
    import mlx.core as mx
    import numpy as np

    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    mask = np.unpackbits(bits, bitorder="little").astype(bool)[:width]
    return mx.array(np.pad(mask, (0, width - len(mask))))


def force_prefix(forced: list[int]) -> Processor:
    """A logits processor that makes the first generated tokens `forced`."""
    step = [0]

    def force(tokens: Any, logits: Any) -> Any:
        i = step[0]
        step[0] += 1
        if i >= len(forced):
            return logits
        return _keep(logits, _only([forced[i]], logits.shape[-1]))

    return force


def constrain(
    lltok: Any, grammar: str, eos: list[int], fault: list[str], what: str = "response_format"
) -> Processor:
    """A logits processor that allows only tokens keeping the output inside `grammar`
    (llguidance computes the allowed set for each step; once the grammar is complete,
    only end-of-sequence is allowed). Should the matcher fail, it says why in `fault`,
    which ends the request with an error: never unconstrained output."""
    from llguidance import LLMatcher

    matcher = LLMatcher(lltok, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(matcher.get_error())
    step = [0]

    def constrain(tokens: Any, logits: Any) -> Any:
        # Once complete, the matcher takes nothing more (ignore_eos keeps writing EOS).
        if step[0] and not matcher.is_stopped():
            matcher.consume_token(int(tokens.reshape(-1)[-1].item()))
        step[0] += 1
        if matcher.is_error():
            fault[:] = [f"{what}: {matcher.get_error()}"]
        if matcher.is_error() or matcher.is_stopped():
            return _keep(logits, _only(eos, logits.shape[-1]))
        return _keep(logits, _allowed(matcher, logits.shape[-1]))

    return constrain


def call_grammar(
    lltok: Any, grammar: str, start: list[int], end: list[int], eos: list[int], fault: list[str]
) -> Processor:
    """A lazy grammar for JSON tool calls: free text until the model writes the call
    marker, then only what `grammar` allows (grammar.py: a real tool's name and arguments)
    and the end marker. Calls are then always well-formed, so their arguments
    can stream. A matcher that fails says why in `fault` (the request ends with an
    error) rather than let a call be decoded freely."""
    from llguidance import LLMatcher

    state: dict[str, Any] = {"step": 0, "recent": [], "matcher": None, "ending": []}

    def constrain(tokens: Any, logits: Any) -> Any:
        width = logits.shape[-1]
        last = int(tokens.reshape(-1)[-1].item()) if state["step"] else None
        state["step"] += 1
        matcher = state["matcher"]
        if state["ending"]:  # writing the end marker, token by token
            return _keep(logits, _only([state["ending"].pop(0)], width))
        if matcher is None:
            if last is not None:
                state["recent"] = (state["recent"] + [last])[-len(start) :]
            if state["recent"] != start:
                return logits
            matcher = state["matcher"] = LLMatcher(lltok, grammar, log_level=0)
        elif last is not None and not fault:
            matcher.consume_token(last)
        if matcher.is_error():
            fault[:] = [f"tool call: {matcher.get_error()}"]
            return _keep(logits, _only(eos, width))
        if matcher.is_stopped():  # the call's JSON is complete: the end marker follows
            state["matcher"], state["recent"] = None, []
            state["ending"] = list(end[1:])
            return _keep(logits, _only([end[0]], width))
        return _keep(logits, _allowed(matcher, width))

    return constrain


def only_calls_follow(
    start: list[int], end: list[int], eos: list[int], parallel: bool
) -> Processor:
    """For a forced call (tool_choice required or named): the call is the whole answer.
    After its end marker only end-of-sequence may follow, or another call's start marker
    when parallel calls are allowed; a model that would go on writing text cannot."""
    allowed = eos + (start[:1] if parallel else [])
    state: dict[str, Any] = {"step": 0, "recent": [], "after": False, "opening": []}

    def only_calls(tokens: Any, logits: Any) -> Any:
        width = logits.shape[-1]
        last = int(tokens.reshape(-1)[-1].item()) if state["step"] else None
        state["step"] += 1
        if state["opening"]:  # the rest of another call's start marker
            return _keep(logits, _only([state["opening"].pop(0)], width))
        if last is None:
            return logits
        if state["after"]:
            if last != start[0]:  # end-of-sequence (which ignore_eos writes on)
                return _keep(logits, _only(allowed, width))
            state["after"] = False
            if len(start) > 1:
                state["opening"] = list(start[2:])
                return _keep(logits, _only([start[1]], width))
            return logits
        state["recent"] = (state["recent"] + [last])[-len(end) :]
        if state["recent"] != end:
            return logits
        state["after"], state["recent"] = True, []
        return _keep(logits, _only(allowed, width))

    return only_calls


def think_budget(start: list[int], end: list[int], budget: int, inside: bool) -> Processor:
    """Reasoning capped at `budget` tokens, in all the output's think blocks together: once
    they are spent, the think block's end marker is forced and the model goes on with its
    answer (a block opened after that closes at once). `inside`: the prompt ends inside a
    think block (its template opened it). Tokens are counted here, from the tokens the model
    wrote, not from their text: the batch decodes one step ahead of the text."""
    state: dict[str, Any] = {"step": 0, "inside": inside, "spent": 0, "recent": [], "ending": []}
    span = max(len(start), len(end))

    def cap(tokens: Any, logits: Any) -> Any:
        width = logits.shape[-1]
        last = int(tokens.reshape(-1)[-1].item()) if state["step"] else None
        state["step"] += 1
        if state["ending"]:  # the rest of the end marker, token by token
            return _keep(logits, _only([state["ending"].pop(0)], width))
        if last is not None:
            recent = state["recent"] = (state["recent"] + [last])[-span:]
            if not state["inside"]:
                state["inside"] = recent[-len(start) :] == start
            elif recent[-len(end) :] == end:
                state["inside"] = False
            else:
                state["spent"] += 1
        if not state["inside"] or state["spent"] < budget:
            return logits
        state["inside"], state["recent"] = False, []
        state["ending"] = list(end[1:])
        return _keep(logits, _only([end[0]], width))

    return cap
