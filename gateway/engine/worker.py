"""The code that runs inside one worker process (spawned, never forked): it owns all MLX state
for one model and drives mlx-lm's BatchGenerator, admitting new requests between decode steps.

Protocol: see gateway/engine/protocol.py. Everything MLX happens on this process's main thread.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.catalog.local import context_length_of, think_markers
from gateway.engine.channels import ChannelSplitter, Markers
from gateway.engine.pipe import WorkerPipe
from gateway.engine.protocol import (
    Activity,
    Cancel,
    Event,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    Load,
    LoadFailed,
    Logprob,
    Ready,
    Reasoning,
    Started,
    Stop,
    Text,
    ToolCallArgs,
    ToolCallStart,
    Warm,
)
from gateway.observe.logs import WORKER_LOG_BYTES, WorkerLogHandler, redirect_output

log = logging.getLogger("mlx_manager.worker")

KEY = "model"  # the prompt cache's model key: a worker serves one model
REPORT_SECONDS = 0.5
HEARTBEAT_SECONDS = 1.0  # the gateway judges a worker hung by this beat's absence


@dataclass
class _Sequence:
    rid: str
    detokenizer: Any
    stops: list[str]
    max_stop: int
    logprobs: bool
    top_logprobs: int
    tokens: int = 0
    pending: str = ""  # decoded text held back because it may be the start of a stop string
    channels: ChannelSplitter | None = None  # reasoning and tool calls, when the model has them
    parallel_tool_calls: bool = True
    tool_calls_sent: int = 0
    reasoning_tokens: int = 0
    ignore_eos: bool = False  # benchmarks: run to max_tokens, end-of-sequence tokens and all
    # Why a grammar stopped holding the output (its logits processors write here): the
    # request then ends with an error instead of going on unconstrained.
    fault: list[str] = field(default_factory=list)


def _finite(logprob: float) -> float:
    """Tokens a grammar or a -100 logit_bias rules out have a logprob of -inf, which JSON
    cannot carry: -9999.0 stands for it, as in OpenAI's answers."""
    return max(float(logprob), -9999.0) if logprob == logprob else -9999.0


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


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        conn: WorkerPipe,
        context_length: int,
        batch_size: int,
        vocab_size: int,
        prompt_cache_bytes: int = 0,
        think: tuple[str, str] | None = None,
    ) -> None:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator, StopSequences

        self.mx = mx
        self.tokenizer = tokenizer
        self.conn = conn
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.gen = BatchGenerator(
            model,
            completion_batch_size=batch_size,
            prefill_batch_size=min(8, batch_size),
            stream=mx.new_stream(mx.default_device()),
        )
        self.eos = StopSequences([[t] for t in tokenizer.eos_token_ids])
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.no_stop = StopSequences()  # ignore_eos: only max_tokens ends the sequence
        self.think = think  # reasoning markers: gateway.hub.think_markers, as model_info says
        self.seqs: dict[int, _Sequence] = {}
        self.uid_of: dict[str, int] = {}
        self.samplers: dict[tuple[float, float], Callable[..., Any]] = {}
        self.generated_total = 0
        self.token_texts: dict[int, str] = {}
        self.reported: tuple[int, int] | None = None
        self.reported_at = 0.0
        self.lltok: Any = None  # llguidance tokenizer, for response_format
        # KV caches of finished sequences, found again by longest common token prefix (chats
        # resend their history); mlx-lm's trie + LRU, bounded in bytes.
        from mlx_lm.models.cache import LRUPromptCache

        self.prompt_cache = (
            LRUPromptCache(max_size=64, max_bytes=prompt_cache_bytes)
            if prompt_cache_bytes > 0
            else None
        )

    # Requests ---------------------------------------------------------------------------------

    def submit(self, rid: str, req: dict[str, Any], events: list[Event]) -> None:
        try:
            prompt = self._tokenize(req)
        except Exception as e:  # a template that rejects the messages, bad content, ...
            events.append(Failed(rid, "InvalidRequest", f"Could not build the prompt: {e}"))
            return
        limit = min(self.context_length, req.get("context_length") or self.context_length)
        if len(prompt) >= limit:
            events.append(
                Failed(
                    rid,
                    "ContextLengthExceeded",
                    f"This model's maximum context length is {limit} tokens, but the prompt "
                    f"has {len(prompt)} tokens. Shorten the messages or the prompt.",
                )
            )
            return
        bad = [t for t in req.get("logit_bias") or {} if t >= self.vocab_size]
        if bad:
            events.append(
                Failed(
                    rid,
                    "InvalidRequest",
                    f"logit_bias: token id {bad[0]} is "
                    f"outside this model's vocabulary of {self.vocab_size} tokens.",
                )
            )
            return
        room = limit - len(prompt)
        max_tokens = min(req.get("max_tokens") or room, room)
        stops = [s for s in req.get("stop") or [] if s]
        fault: list[str] = []
        parallel = bool(req.get("parallel_tool_calls", True))
        try:
            channels, forced = self._channels(req, prompt)
            processors = self._processors(req)
            if forced:
                processors.append(self._force_prefix(forced))
            if req.get("grammar"):
                processors.append(self._constrain(req["grammar"], fault))
            elif channels is not None and channels.json_calls:
                processors.append(
                    self._call_grammar(req["tool_grammar"], channels.markers.tool, fault)
                )
            if forced and channels is not None and channels.markers.tool:
                processors.append(self._only_calls_follow(channels.markers.tool, parallel))
            cache, cached = self._cached_prefix(prompt)
            (uid,) = self.gen.insert(
                [prompt[cached:]],
                caches=[cache],
                all_tokens=[prompt[:cached]],
                max_tokens=[max_tokens],
                samplers=[self._sampler(req)],
                logits_processors=[processors],
                stop_sequences=[self.no_stop if req.get("ignore_eos") else self.eos],
            )
        except Exception as e:  # one bad request must not take the model down for everyone
            log.warning("request %s: could not start generation", rid, exc_info=True)
            events.append(Failed(rid, "InvalidRequest", f"Could not start generation: {e}"))
            return
        self.seqs[uid] = _Sequence(
            rid,
            self.tokenizer.detokenizer,
            stops,
            max((len(s) for s in stops), default=0),
            bool(req.get("logprobs")),
            int(req.get("top_logprobs") or 0),
            channels=channels,
            parallel_tool_calls=parallel,
            ignore_eos=bool(req.get("ignore_eos")),
            fault=fault,
        )
        self.uid_of[rid] = uid
        events.append(Started(rid, len(prompt), cached))

    def _cached_prefix(self, prompt: list[int]) -> tuple[Any, int]:
        """A KV cache for the longest cached prefix of `prompt`, and that prefix's length. At
        least the last prompt token is always computed: its logits give the first token."""
        if self.prompt_cache is None:
            return None, 0
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self.prompt_cache.fetch_nearest_cache(KEY, prompt)
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt was cached
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            return cache, len(prompt) - 1
        return cache, len(prompt) - len(rest)

    def _channels(
        self, req: dict[str, Any], prompt: list[int]
    ) -> tuple[ChannelSplitter | None, list[int]]:
        """The splitter for this request's output (None: plain text), and the tokens the
        output must start with (a tool call, when tool_choice requires one)."""
        tok = self.tokenizer
        if req["kind"] != "chat":
            return None, []  # a raw completion is raw text
        think = self.think if req.get("reasoning") != "inline" else None
        tool, parse, json_calls = None, None, False
        if req.get("tools"):
            name = req.get("tool_parser")
            if name:  # a profile's choice over the tokenizer's own
                module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
                tool, parser = (
                    (module.tool_call_start, module.tool_call_end),
                    module.parse_tool_call,
                )
            elif tok.has_tool_calling:
                tool, parser = (tok.tool_call_start, tok.tool_call_end), tok.tool_parser
            if tool:
                tools = req["tools"]
                parse = lambda body: parser(body, tools)  # noqa: E731
                json_calls = parser.__module__ == "mlx_lm.tool_parsers.json_tools"
        if think is None and tool is None:
            return None, []
        # A template may open the think block itself (the prompt ends inside it).
        tail = tok.decode(prompt[-16:]) if think else ""
        inside = think is not None and tail.rfind(think[0]) > tail.rfind(think[1])
        forced: list[int] = []
        if tool and req.get("tool_choice") == "required":
            forced = tok.encode(tool[0], add_special_tokens=False)
        splitter = ChannelSplitter(
            Markers(think, tool), parse, in_reasoning=inside, json_calls=json_calls
        )
        return splitter, forced

    def _force_prefix(self, forced: list[int]) -> Callable[..., Any]:
        """A logits processor that makes the first generated tokens `forced`."""
        step = [0]

        def force(tokens: Any, logits: Any) -> Any:
            i = step[0]
            step[0] += 1
            if i >= len(forced):
                return logits
            return _keep(logits, _only([forced[i]], logits.shape[-1]))

        return force

    def _constrain(self, grammar: str, fault: list[str]) -> Callable[..., Any]:
        """A logits processor that allows only tokens keeping the output inside `grammar`
        (llguidance computes the allowed set for each step; once the grammar is complete,
        only end-of-sequence is allowed). Should the matcher fail, it says why in `fault`,
        which ends the request with an error: never unconstrained output."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        eos = list(self.tokenizer.eos_token_ids)
        step = [0]

        def constrain(tokens: Any, logits: Any) -> Any:
            # Once complete, the matcher takes nothing more (ignore_eos keeps writing EOS).
            if step[0] and not matcher.is_stopped():
                matcher.consume_token(int(tokens.reshape(-1)[-1].item()))
            step[0] += 1
            if matcher.is_error():
                fault[:] = [f"response_format: {matcher.get_error()}"]
            if matcher.is_error() or matcher.is_stopped():
                return _keep(logits, _only(eos, logits.shape[-1]))
            return _keep(logits, _allowed(matcher, logits.shape[-1]))

        return constrain

    def _call_grammar(self, grammar: str, markers: Any, fault: list[str]) -> Callable[..., Any]:
        """A lazy grammar for JSON tool calls: free text until the model writes the call
        marker, then only what `grammar` allows (gateway/engine/grammar.py: a real tool's name and
        arguments) and the end marker. Calls are then always well-formed, so their arguments
        can stream. A matcher that fails says why in `fault` (the request ends with an
        error) rather than let a call be decoded freely."""
        from llguidance import LLMatcher

        start = self.tokenizer.encode(markers[0], add_special_tokens=False)
        end = self.tokenizer.encode(markers[1], add_special_tokens=False)
        eos = list(self.tokenizer.eos_token_ids)
        lltok = self._lltokenizer()
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

    def _only_calls_follow(self, markers: Any, parallel: bool) -> Callable[..., Any]:
        """For a forced call (tool_choice required or named): the call is the whole answer.
        After its end marker only end-of-sequence may follow, or another call's start marker
        when parallel calls are allowed; a model that would go on writing text cannot."""
        start = self.tokenizer.encode(markers[0], add_special_tokens=False)
        end = self.tokenizer.encode(markers[1], add_special_tokens=False)
        allowed = list(self.tokenizer.eos_token_ids) + (start[:1] if parallel else [])
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

    def _lltokenizer(self) -> Any:
        """llguidance's view of this tokenizer: built on first use (about a second)."""
        if self.lltok is None:
            import llguidance.hf

            self.lltok = llguidance.hf.from_tokenizer(
                self.tokenizer._tokenizer,
                n_vocab=self.vocab_size,
                eos_token=list(self.tokenizer.eos_token_ids),
            )
        return self.lltok

    def _tokenize(self, req: dict[str, Any]) -> list[int]:
        tok = self.tokenizer
        if req["kind"] == "chat":
            extra = {"tools": req["tools"]} if req.get("tools") else {}
            ids = tok.apply_chat_template(req["messages"], add_generation_prompt=True, **extra)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = tok.encode(req.get("prompt") or "")
        if not ids and tok.bos_token_id is not None:
            ids = [tok.bos_token_id]
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _sampler(self, req: dict[str, Any]) -> Callable[..., Any]:
        mx = self.mx
        from mlx_lm.sample_utils import apply_top_p

        temp = float(req.get("temperature") or 0.0)
        top_p = float(req.get("top_p") or 0.0) if req.get("top_p") is not None else 1.0
        seed = req.get("seed")
        if temp == 0:
            temp, top_p, seed = 0.0, 1.0, None  # greedy: one shared sampler batches every row
        if seed is None and (temp, top_p) in self.samplers:
            return self.samplers[(temp, top_p)]
        # A request with a seed owns a PRNG key so its output does not depend on what else is
        # in the batch (mx.random's global state is shared by every row).
        # PRNG keys are uint64: a negative or n>1-shifted seed wraps instead of failing.
        key = [mx.random.key(int(seed) % 2**64)] if seed is not None else None

        def sample(logprobs: Any) -> Any:
            if temp == 0:
                return mx.argmax(logprobs, axis=-1)
            if 0 < top_p < 1:
                logprobs = apply_top_p(logprobs, top_p)
            if key is None:
                return mx.random.categorical(logprobs * (1 / temp))
            key[0], sub = mx.random.split(key[0])
            return mx.random.categorical(logprobs * (1 / temp), key=sub)

        if seed is None:
            self.samplers[(temp, top_p)] = sample
        return sample

    def _processors(self, req: dict[str, Any]) -> list[Any]:
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(
            logit_bias=req.get("logit_bias") or None,
            presence_penalty=req.get("presence_penalty") or None,
            frequency_penalty=req.get("frequency_penalty") or None,
        )

    def cancel(self, rid: str) -> None:
        uid = self.uid_of.pop(rid, None)
        if uid is not None:
            self.seqs.pop(uid, None)
            self.gen.remove([uid])

    # Decoding -----------------------------------------------------------------------------------

    def step(self, events: list[Event]) -> None:
        _, responses = self.gen.next()
        done: list[int] = []
        for r in responses:
            seq = self.seqs.get(r.uid)
            if seq is None:
                continue
            seq.tokens += 1
            self.generated_total += 1
            if seq.fault:  # its grammar failed: end it rather than let it decode freely
                events.append(
                    Failed(seq.rid, "ServiceError", f"The output grammar failed: {seq.fault[0]}")
                )
                del self.seqs[r.uid]
                del self.uid_of[seq.rid]
                if r.finish_reason is None:
                    done.append(r.uid)
                continue
            # An end-of-sequence token is not part of the text (with ignore_eos neither).
            if r.finish_reason != "stop" and not (seq.ignore_eos and r.token in self.eos_ids):
                seq.detokenizer.add_token(r.token)
            if r.finish_reason is not None:
                seq.detokenizer.finalize()
            text, hit_stop = self._hold_back(
                seq, seq.detokenizer.last_segment, final=r.finish_reason is not None
            )
            final = r.finish_reason is not None or hit_stop
            lp = self._logprob(seq, r) if seq.logprobs else None
            if seq.channels is None:
                if text or lp is not None:
                    events.append(Text(seq.rid, text, lp))
            else:
                self._split(seq, text, final, lp, events)
            if r.finish_reason is not None and self.prompt_cache is not None:
                if r.prompt_cache:
                    self.prompt_cache.insert_cache(KEY, list(r.all_tokens), r.prompt_cache)
            reason = "stop" if hit_stop else r.finish_reason
            if reason == "stop" and seq.channels is not None and seq.channels.tool_calls:
                reason = "tool_calls"
            if reason is not None:
                events.append(Finished(seq.rid, reason, seq.tokens, seq.reasoning_tokens))
                del self.seqs[r.uid]
                del self.uid_of[seq.rid]
                if r.finish_reason is None:
                    done.append(r.uid)
        if done:
            self.gen.remove(done)

    def _split(self, seq: _Sequence, text: str, final: bool, lp: Any, events: list[Event]) -> None:
        """Route text to content, reasoning or tool calls. A token's logprob goes with the
        content it produced; text that went to reasoning or a tool call carries none."""
        assert seq.channels is not None
        reasoned = False
        for part in seq.channels.feed(text, final):
            if part[0] == "content":
                events.append(Text(seq.rid, part[1], lp))
                lp = None
            elif part[0] == "reasoning":
                events.append(Reasoning(seq.rid, part[1]))
                reasoned = True
            elif part[0] == "tool_start":
                seq.tool_calls_sent += 1
                if seq.parallel_tool_calls or seq.tool_calls_sent == 1:
                    events.append(ToolCallStart(seq.rid, f"call_{uuid.uuid4().hex[:24]}", part[1]))
            elif seq.parallel_tool_calls or seq.tool_calls_sent == 1:
                events.append(ToolCallArgs(seq.rid, part[1]))
        seq.reasoning_tokens += reasoned  # a token whose text went (partly) to reasoning

    def _hold_back(self, seq: _Sequence, text: str, final: bool) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached (never emitted)."""
        if not seq.stops:
            return text, False
        buf = seq.pending + text
        hits = [i for i in (buf.find(s) for s in seq.stops) if i >= 0]
        if hits:
            seq.pending = ""
            return buf[: min(hits)], True
        if final:
            seq.pending = ""
            return buf, False
        keep = 0  # the longest tail of buf that could still grow into a stop string
        for n in range(min(len(buf), seq.max_stop - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in seq.stops):
                keep = n
                break
        seq.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def _token_text(self, token: int) -> str:
        """A token's text for logprobs. A token holding part of a UTF-8 character decodes to
        U+FFFD, like many others: its vocabulary name keeps it distinguishable."""
        text = self.token_texts.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            if "\ufffd" in text:
                text = self.tokenizer.convert_ids_to_tokens(token)
            self.token_texts[token] = text
        return text

    def _logprob(self, seq: _Sequence, r: Any) -> Logprob:
        mx = self.mx
        decode = self._token_text
        top: list[tuple[str, float]] = []
        if seq.top_logprobs > 0:
            k = seq.top_logprobs
            idx = mx.argpartition(-r.logprobs, kth=k - 1)[:k]
            vals = r.logprobs[idx]
            order = mx.argsort(-vals)
            ids, lps = idx[order].tolist(), vals[order].tolist()
            top = [(decode(i), _finite(v)) for i, v in zip(ids, lps, strict=True)]
        return Logprob(decode(r.token), _finite(r.logprobs[r.token].item()), top)

    # Main loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        conn = self.conn
        while True:
            if not self.seqs:
                self._report()
                conn.poll(None)  # idle: sleep until the gateway writes (or goes away)
            events: list[Event] = []
            while conn.poll(0):
                msg = conn.recv()
                if isinstance(msg, Generate):
                    self.submit(msg.rid, msg.request, events)
                elif isinstance(msg, Cancel):
                    self.cancel(msg.rid)
                elif isinstance(msg, Stop):
                    return
            if self.seqs:
                self.step(events)
            if events:
                conn.send(events)
            self._report()

    def _report(self) -> None:
        """Tell the gateway how many sequences run here whenever that number changes, and
        how many tokens it has made at least every REPORT_SECONDS while it generates (the
        gateway's tokens/s and memory figures)."""
        state = (len(self.seqs), self.generated_total)
        now = time.monotonic()
        if (
            self.reported is None
            or state[0] != self.reported[0]
            or (state[0] and now - self.reported_at >= REPORT_SECONDS)
        ):
            self.reported, self.reported_at = state, now
            # MLX's own figure: weights, KV caches and its buffer cache, what the budget counts.
            memory = self.mx.get_active_memory() + self.mx.get_cache_memory()
            self.conn.send([Activity(*state, memory)])


def _log_to(options: dict[str, Any]) -> None:
    """From now on everything this process prints goes to its model's log file (a warm spare
    prints to the gateway's stderr until it is given a model), and a fatal fault (SIGSEGV,
    SIGABRT, ...) leaves the Python traceback of every thread there."""
    if not options.get("log_file"):
        return
    path = Path(options["log_file"])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        redirect_output(path)
    except OSError as e:  # an unwritable log folder must not stop the model from loading
        print(f"worker: cannot write {path} ({e}); logging to stderr", file=sys.stderr)
        return
    handler = WorkerLogHandler(path, int(options.get("log_max_bytes") or WORKER_LOG_BYTES))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    faulthandler.enable(file=sys.stderr, all_threads=True)


def _start_heartbeat(conn: WorkerPipe, interval: float) -> None:
    """Tell the gateway this process still runs, from a thread of its own: MLX releases the
    GIL while it computes, so the beat goes on through a long prefill or load, and stops only
    when the process cannot run at all (stopped, deadlocked, swapped out)."""

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                conn.send(Heartbeat())
            except OSError:
                return  # the gateway went away; the main thread finds out too

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def serve(conn: WorkerPipe, model_path: str, options: dict[str, Any]) -> None:
    """Load the model, say so, then generate until told to stop or the gateway goes away."""
    _log_to(options)
    _start_heartbeat(conn, float(options.get("heartbeat_seconds") or HEARTBEAT_SECONDS))
    log.info("loading %s (pid %d)", model_path, os.getpid())
    started = time.perf_counter()
    try:
        import mlx.core as mx
        import mlx_lm

        model, tokenizer, config = mlx_lm.load(model_path, return_config=True)  # type: ignore[misc]
        context = context_length_of(config) or 4096
    except BaseException as e:  # noqa: BLE001 - any load failure is reported, not raised
        log.error("load failed: %s: %s\n%s", type(e).__name__, e, traceback.format_exc())
        try:
            conn.send(LoadFailed(f"{type(e).__name__}: {e}", traceback.format_exc()))
        finally:
            conn.close()
        return
    info = {
        "pid": os.getpid(),
        "load_seconds": time.perf_counter() - started,
        "memory_bytes": int(mx.get_active_memory() + mx.get_cache_memory()),
        "context_length": context,
    }
    log.info(
        "loaded in %.2fs: %.1f MiB, context %d tokens",
        info["load_seconds"],
        info["memory_bytes"] / 2**20,
        context,
    )
    conn.send(Ready(info))
    try:
        assert config is not None
        cfg: dict[str, Any] = config.get("text_config") or config
        vocab = max(int(cfg.get("vocab_size") or 0), len(tokenizer))
        Engine(
            model,
            tokenizer,
            conn,
            context,
            int(options.get("batch_size", 32)),
            vocab,
            int(options.get("prompt_cache_bytes", 0)),
            think_markers(Path(model_path)),
        ).run()
        log.info("stopping: asked by the gateway")
    except (EOFError, OSError, KeyboardInterrupt):
        log.info("stopping: the gateway went away")
    finally:
        mx.clear_streams()


def main(argv: list[str] | None = None) -> None:
    """`python -m gateway.engine.worker --fd N`: started by the gateway, never by hand.

    It imports MLX and mlx-lm first (over a second of a model's cold start), says "warm", then
    waits for ("load", path, options): the gateway keeps one such process ready in advance."""
    parser = argparse.ArgumentParser(prog="python -m gateway.engine.worker")
    parser.add_argument("--fd", type=int, required=True, help="socket inherited from the gateway")
    args = parser.parse_args(argv)
    conn = WorkerPipe(args.fd)
    try:
        import mlx.core  # noqa: F401
        import mlx_lm.generate  # noqa: F401

        conn.send(Warm(os.getpid()))
        msg = conn.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the gateway went away (or shut down) before this worker was needed
    if isinstance(msg, Load):
        serve(conn, msg.path, msg.options)


if __name__ == "__main__":
    main()
