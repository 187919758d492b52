"""The Engine: all MLX state of one model inside its worker process. It drives mlx-lm's
BatchGenerator, admitting new requests between decode steps, and turns each step into events
(gateway/engine/protocol.py): text held back at stop strings, split into content, reasoning and
tool calls, logprobs; with the prompt cache, sampling and logits processors of each request.
Everything MLX happens on the worker's main thread."""

from __future__ import annotations

import importlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.catalog.local import template_text, thinking_switch
from gateway.engine import embedder, logits
from gateway.engine.channels import ChannelSplitter, Markers
from gateway.engine.grammar import tool_call_grammar
from gateway.engine.pipe import WorkerPipe
from gateway.engine.protocol import (
    Activity,
    Cancel,
    Embed,
    Embedded,
    Event,
    Failed,
    Finished,
    Generate,
    Logprob,
    Reasoning,
    Started,
    Stop,
    Text,
    ToolCallArgs,
    ToolCallStart,
)

log = logging.getLogger("mlx_manager.worker")

KEY = "model"  # the prompt cache's model key: a worker serves one model
REPORT_SECONDS = 0.5
# A tool for finding out whether a chat template shows tools at all.
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "probe_tool", "parameters": {"type": "object", "properties": {}}},
}

# A tool-call format: its start and end markers, its parser (body, tools) -> call(s), and
# whether its calls are JSON {"name", "arguments"} (which can stream under a grammar).
ToolFormat = tuple[tuple[str, str], Callable[[str, Any], Any], bool]


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
        self.model = model
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
        # How thinking is turned off: a template variable, an empty think block, or not at
        # all (catalog.local.thinking_switch, as model_info says).
        self.switch = thinking_switch(
            template_text(getattr(tokenizer, "chat_template", None)), think
        )
        self.shows_tools: bool | None = None  # does the template show tools? (found on first use)
        self.seqs: dict[int, _Sequence] = {}
        self.embeds: dict[str, embedder.Job] = {}  # embedding requests, oldest first
        self.uid_of: dict[str, int] = {}
        self.samplers: dict[tuple[float, float, int, float], Callable[..., Any]] = {}
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
            tool_format = self._tool_format(req)
            # A call forced on a model that has no call format: the output is the call's JSON.
            call_only = bool(req.get("tools")) and req.get("tool_choice") == "required"
            call_only = call_only and tool_format is None
            prompt = self._tokenize(req, call_only, native=tool_format is not None)
        except Exception as e:  # a template that rejects the messages, bad content, ...
            events.append(Failed(rid, "InvalidRequest", f"Could not build the prompt: {e}"))
            return
        if req.get("count_only"):  # count_tokens: the prompt's length is the whole answer
            events.append(Started(rid, len(prompt), 0))
            events.append(Finished(rid, "stop", 0))
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
            channels, forced = self._channels(req, prompt, tool_format, call_only)
            processors = self._processors(req)
            if forced:
                processors.append(logits.force_prefix(forced))
            budget = req.get("reasoning_budget")
            if budget is not None and self.think and req["kind"] == "chat" and not call_only:
                start, end = (
                    self.tokenizer.encode(m, add_special_tokens=False) for m in self.think
                )
                processors.append(logits.think_budget(start, end, budget, self._inside(prompt)))
            if call_only:  # the whole answer is one call, under its grammar
                grammar = req.get("tool_grammar") or tool_call_grammar(req["tools"])
                processors.append(
                    logits.constrain(
                        self._lltokenizer(), grammar, list(self.eos_ids), fault, "tool call"
                    )
                )
            elif req.get("grammar"):
                processors.append(
                    logits.constrain(self._lltokenizer(), req["grammar"], list(self.eos_ids), fault)
                )
            elif channels is not None and channels.json_calls:
                processors.append(
                    logits.call_grammar(
                        self._lltokenizer(), req["tool_grammar"], *self._markers(channels), fault
                    )
                )
            if forced and channels is not None and channels.markers.tool:
                processors.append(logits.only_calls_follow(*self._markers(channels), parallel))
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

    def _tool_format(self, req: dict[str, Any]) -> ToolFormat | None:
        """How this model writes tool calls, for a chat request with tools: a profile's
        parser over the tokenizer's own; None when it has no format (or no tools came)."""
        if req["kind"] != "chat" or not req.get("tools"):
            return None
        tok = self.tokenizer
        name = req.get("tool_parser")
        if name:  # a profile's choice over the tokenizer's own
            module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
            markers, parser = (module.tool_call_start, module.tool_call_end), module.parse_tool_call
        elif tok.has_tool_calling:
            markers, parser = (tok.tool_call_start, tok.tool_call_end), tok.tool_parser
        else:
            return None
        return markers, parser, parser.__module__ == "mlx_lm.tool_parsers.json_tools"

    def _inside(self, prompt: list[int]) -> bool:
        """Whether the prompt ends inside a think block (a template may open it)."""
        if self.think is None:
            return False
        tail = self.tokenizer.decode(prompt[-16:])
        return tail.rfind(self.think[0]) > tail.rfind(self.think[1])

    def _channels(
        self,
        req: dict[str, Any],
        prompt: list[int],
        tool_format: ToolFormat | None,
        call_only: bool,
    ) -> tuple[ChannelSplitter | None, list[int]]:
        """The splitter for this request's output (None: plain text), and the tokens the
        output must start with (a tool call, when tool_choice requires one)."""
        if req["kind"] != "chat":
            return None, []  # a raw completion is raw text
        if call_only:
            return ChannelSplitter(Markers(), json.loads, json_calls=True, in_call=True), []
        think = self.think if req.get("reasoning") != "inline" else None
        tool, parse, json_calls = None, None, False
        if tool_format is not None:
            tool, parser, json_calls = tool_format
            tools = req["tools"]
            parse = lambda body: parser(body, tools)  # noqa: E731
        if think is None and tool is None:
            return None, []
        forced: list[int] = []
        if tool and req.get("tool_choice") == "required":
            forced = self.tokenizer.encode(tool[0], add_special_tokens=False)
        splitter = ChannelSplitter(
            Markers(think, tool),
            parse,
            in_reasoning=think is not None and self._inside(prompt),
            json_calls=json_calls,
        )
        return splitter, forced

    def _markers(self, channels: ChannelSplitter) -> tuple[list[int], list[int], list[int]]:
        """The tool call's start and end markers as tokens, and the end-of-sequence tokens."""
        start, end = channels.markers.tool or ("", "")
        encode = self.tokenizer.encode
        return (
            encode(start, add_special_tokens=False),
            encode(end, add_special_tokens=False),
            list(self.tokenizer.eos_token_ids),
        )

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

    def _tokenize(
        self, req: dict[str, Any], call_only: bool = False, native: bool = True
    ) -> list[int]:
        tok = self.tokenizer
        if req["kind"] == "chat":
            ids = self._chat_prompt(req, call_only, native)
        else:
            ids = tok.encode(req.get("prompt") or "")
        if not ids and tok.bos_token_id is not None:
            ids = [tok.bos_token_id]
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _chat_prompt(self, req: dict[str, Any], call_only: bool, native: bool) -> list[int]:
        """The chat template applied to the request's messages, with its tools, its thinking
        switch and its extra template variables (which win over the switch). `native`: the
        model has a tool-call format, and its template always gets the tools."""
        extra: dict[str, Any] = {}
        thinking = req.get("thinking")
        if thinking is None and req.get("reasoning_budget") == 0:
            thinking = False  # no reasoning at all: the model's own way of not thinking
        if thinking is not None and self.switch in ("enable_thinking", "thinking"):
            extra[self.switch] = bool(thinking)
        extra.update(req.get("template_kwargs") or {})
        messages = req["messages"]
        tools = req.get("tools")
        if tools and (native or self._shows_tools()):
            extra["tools"] = tools
        elif tools and call_only:
            # The template would not show the tools: the model learns them from the
            # system prompt, or it could not know which to call or with what.
            try:
                return self._apply(_with_tool_list(messages, tools), extra, thinking)
            except Exception:  # a template that refuses system messages: without the list
                pass
        return self._apply(messages, extra, thinking)

    def _apply(
        self, messages: list[dict[str, Any]], extra: dict[str, Any], thinking: bool | None
    ) -> list[int]:
        tok = self.tokenizer
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if thinking is False and self.switch == "prefix" and self.think:
            # No switch in the template: the answer starts after an empty think block, as
            # Qwen3's template writes it when thinking is off (closing one the template
            # opened). It is prompt, not output: nothing of it is reported as reasoning.
            start, end = self.think
            block = f"{end}\n\n" if self._inside(ids) else f"{start}\n\n{end}\n\n"
            ids += tok.encode(block, add_special_tokens=False)
        return ids

    def _shows_tools(self) -> bool:
        """Whether the chat template shows the tools it is given. One that ignores them (or
        fails on them) is not given them: they would change nothing or break the prompt.
        Found once, on a one-message chat; a template that cannot render that is trusted."""
        if self.shows_tools is None:
            apply = self.tokenizer.apply_chat_template
            probe = [{"role": "user", "content": "hello"}]
            try:
                plain = apply(probe, add_generation_prompt=True, tokenize=False)
            except Exception:
                self.shows_tools = True
                return True
            try:
                shown = apply(
                    probe, add_generation_prompt=True, tokenize=False, tools=[_PROBE_TOOL]
                )
            except Exception:
                self.shows_tools = False
            else:
                self.shows_tools = shown != plain
        return self.shows_tools

    def _sampler(self, req: dict[str, Any]) -> Callable[..., Any]:
        mx = self.mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        temp = float(req.get("temperature") or 0.0)
        top_p = float(req.get("top_p") or 0.0) if req.get("top_p") is not None else 1.0
        top_k = int(req.get("top_k") or 0)
        if not 0 < top_k < self.vocab_size:
            top_k = 0  # 0, or at least the whole vocabulary: no cut
        min_p = float(req.get("min_p") or 0.0)
        seed = req.get("seed")
        if temp == 0:
            # greedy: one sampler batches every row
            temp, top_p, top_k, min_p, seed = 0.0, 1.0, 0, 0.0, None
        if seed is None and (temp, top_p, top_k, min_p) in self.samplers:
            return self.samplers[(temp, top_p, top_k, min_p)]
        # A request with a seed owns a PRNG key so its output does not depend on what else is
        # in the batch (mx.random's global state is shared by every row).
        # PRNG keys are uint64: a negative or n>1-shifted seed wraps instead of failing.
        key = [mx.random.key(int(seed) % 2**64)] if seed is not None else None

        def sample(logprobs: Any) -> Any:
            if temp == 0:
                return mx.argmax(logprobs, axis=-1)
            if top_k:
                logprobs = apply_top_k(logprobs, top_k)
            if 0 < top_p < 1:
                logprobs = apply_top_p(logprobs, top_p)
            if 0 < min_p <= 1:
                logprobs = apply_min_p(logprobs, min_p)
            if key is None:
                return mx.random.categorical(logprobs * (1 / temp))
            key[0], sub = mx.random.split(key[0])
            return mx.random.categorical(logprobs * (1 / temp), key=sub)

        if seed is None:
            self.samplers[(temp, top_p, top_k, min_p)] = sample
        return sample

    def _processors(self, req: dict[str, Any]) -> list[Any]:
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(
            logit_bias=req.get("logit_bias") or None,
            presence_penalty=req.get("presence_penalty") or None,
            frequency_penalty=req.get("frequency_penalty") or None,
            repetition_penalty=req.get("repetition_penalty") or None,
        )

    def embed(self, rid: str, req: dict[str, Any], events: list[Event]) -> None:
        """Take an Embed: its inputs are checked now, its batches computed by embed_step."""
        try:
            self.embeds[rid] = self.new_job(req)
        except embedder.EmbedError as e:
            events.append(Failed(rid, e.kind, str(e)))
        except Exception as e:  # a tokenizer that fails on the text, ...
            log.warning("request %s: could not embed", rid, exc_info=True)
            events.append(Failed(rid, "InvalidRequest", f"Could not read the inputs: {e}"))

    def new_job(self, req: dict[str, Any]) -> embedder.Job:
        return embedder.Job(self.model, self.tokenizer, req, self.context_length, self.vocab_size)

    def embed_step(self, events: list[Event]) -> None:
        """One batch of the oldest embedding request, between two decode steps."""
        rid, job = next(iter(self.embeds.items()))
        try:
            job.step()
            if not job.done:
                return
            del self.embeds[rid]
            events.append(Embedded(rid, *job.result()))
        except embedder.EmbedError as e:
            self.embeds.pop(rid, None)
            events.append(Failed(rid, e.kind, str(e)))
        except Exception as e:  # one bad request must not take the model down for everyone
            self.embeds.pop(rid, None)
            log.warning("request %s: could not embed", rid, exc_info=True)
            events.append(Failed(rid, "ServiceError", f"Could not compute embeddings: {e}"))

    def cancel(self, rid: str) -> None:
        self.embeds.pop(rid, None)
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
            final = r.finish_reason is not None or hit_stop is not None
            lp = self._logprob(seq, r) if seq.logprobs else None
            if seq.channels is None:
                if text or lp is not None:
                    events.append(Text(seq.rid, text, lp))
            else:
                self._split(seq, text, final, lp, events)
            if r.finish_reason is not None and self.prompt_cache is not None:
                if r.prompt_cache:
                    self.prompt_cache.insert_cache(KEY, list(r.all_tokens), r.prompt_cache)
            reason = "stop" if hit_stop is not None else r.finish_reason
            if reason == "stop" and seq.channels is not None and seq.channels.tool_calls:
                reason = "tool_calls"
            if reason is not None:
                events.append(Finished(seq.rid, reason, seq.tokens, seq.reasoning_tokens, hit_stop))
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
            if part.kind == "content":
                events.append(Text(seq.rid, part.text, lp))
                lp = None
            elif part.kind == "reasoning":
                events.append(Reasoning(seq.rid, part.text))
                reasoned = True
            elif part.kind == "tool_start":
                seq.tool_calls_sent += 1
                if seq.parallel_tool_calls or seq.tool_calls_sent == 1:
                    events.append(
                        ToolCallStart(seq.rid, f"call_{uuid.uuid4().hex[:24]}", part.text)
                    )
            elif seq.parallel_tool_calls or seq.tool_calls_sent == 1:
                events.append(ToolCallArgs(seq.rid, part.text))
        seq.reasoning_tokens += reasoned  # a token whose text went (partly) to reasoning

    def _hold_back(self, seq: _Sequence, text: str, final: bool) -> tuple[str, str | None]:
        """Text safe to emit now, and the stop string reached, if one was (never emitted)."""
        if not seq.stops:
            return text, None
        buf = seq.pending + text
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in seq.stops) if i >= 0]
        if hits:
            seq.pending = ""
            at, stop = min(hits)
            return buf[:at], stop
        if final:
            seq.pending = ""
            return buf, None
        keep = 0  # the longest tail of buf that could still grow into a stop string
        for n in range(min(len(buf), seq.max_stop - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in seq.stops):
                keep = n
                break
        seq.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

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
            if not self.seqs and not self.embeds:
                self._report()
                conn.poll(None)  # idle: sleep until the gateway writes (or goes away)
            events: list[Event] = []
            while conn.poll(0):
                msg = conn.recv()
                if isinstance(msg, Generate):
                    self.submit(msg.rid, msg.request, events)
                elif isinstance(msg, Embed):
                    self.embed(msg.rid, msg.request, events)
                elif isinstance(msg, Cancel):
                    self.cancel(msg.rid)
                elif isinstance(msg, Stop):
                    return
            if self.embeds:
                self.embed_step(events)
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


def _with_tool_list(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`messages` with the tools listed in the system message (one is added if none leads),
    and how a call is written: for a forced call on a model whose template shows no tools."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    note = (
        "Answer with a call to one of these tools, written as the JSON object "
        '{"name": <the tool\'s name>, "arguments": <its arguments>}.\nTools:\n' + listing
    )
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = f"{first.get('content') or ''}\n\n{note}".lstrip()
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
