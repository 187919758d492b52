"""Request bodies of the /v1 API, validated with pydantic. Unknown fields are ignored, as
OpenAI-compatible clients send extras; every accepted field either works or is refused."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from config.settings import parse_duration
from gateway.engine.grammar import grammar_for_text, tool_call_grammar
from gateway.engine.request import GenerateRequest, GenerationRequest, effort
from gateway.fields import MAX_TOKENS, Temperature, Tokens, TopP
from gateway.http import jsonbody

MAX_CHOICES = 16
MAX_STOPS = 16
MAX_TEMPLATE_KWARGS = 64
# apply_chat_template's own parameters (transformers' and its renderer's): a template variable
# of one of these names would not reach the template, it would change how it is applied.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "conversations",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


def _duration(v: float | str | None) -> float | str | None:
    try:
        parse_duration(v)
    except ValueError:
        raise ValueError("use seconds or a duration like '30s', '5m', '1h'") from None
    return v


# Ollama's keep_alive, which /v1 and /api both take: how long the model stays loaded after the
# request ("5m", 300; 0 unloads it right after, a negative value keeps it loaded).
KeepAlive = Annotated[float | str | None, AfterValidator(_duration)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


def json_object_text(v: str) -> str:
    """A tool call's arguments: a JSON object as text, as OpenAI sends it ("" counts as {})."""
    try:
        parsed = jsonbody.loads(v or "{}")
    except jsonbody.JSONError as e:
        raise ValueError(f"must be a JSON object in a string ({e})") from None
    if not isinstance(parsed, dict):
        raise ValueError("must be a JSON object in a string")
    return v


class FunctionCall(_Body):
    name: Annotated[str, Field(min_length=1)]
    arguments: Annotated[str, AfterValidator(json_object_text)]


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, in a tool loop
    tool_call_id: str | None = None  # which call a `tool` message answers

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            # Templates (Hugging Face's convention) take arguments as a mapping, not JSON text.
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": json.loads(c.function.arguments or "{}"),
                    },
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            message["name"] = self.name
        return message


class FunctionDef(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef

    def as_template_tool(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(_Body):
    name: str


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self

    def grammar(self) -> str | None:
        return grammar_for_text(self.model_dump_json(by_alias=True, exclude_none=True))


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Annotated[str, Field(min_length=1)]
    max_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    # Token id (as a string, as OpenAI takes it) -> bias added to its logit; -100 bans it.
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    # JSON output, enforced while decoding: every answer parses (and follows the schema).
    response_format: ResponseFormat | None = None
    # vLLM's and llama.cpp's extra (benchmark tools send it): end-of-sequence does not end the
    # answer, max_tokens does.
    ignore_eos: bool = False
    # Ollama's keep_alive: how long the model stays loaded after this request ("5m", 300;
    # 0 unloads it right after, a negative value keeps it loaded).
    keep_alive: KeepAlive = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
        return v

    @property
    def keep_alive_seconds(self) -> float | None:
        return parse_duration(self.keep_alive)

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _common(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stops,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()},
            "grammar": self.response_format.grammar() if self.response_format else None,
            "ignore_eos": self.ignore_eos,
        }

    def generate_request(self) -> GenerateRequest:
        """The service's protocol-neutral request for this body."""
        return GenerateRequest(
            model=self.model,
            choices=self.generation_requests(),
            n=self.n,
            keep_alive=self.keep_alive_seconds,
            stream=bool(self.stream),
            content=self.asked,
        )

    def generation_requests(self) -> list[GenerationRequest]:
        raise NotImplementedError

    def asked(self) -> Any:
        """What was asked, as the request log keeps it (only with log_content)."""
        raise NotImplementedError

    def _seeds(self, count: int) -> list[int | None]:
        # With n > 1 and a seed, each choice gets its own seed: same request, same answers.
        return [None if self.seed is None else self.seed + i for i in range(count)]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Tokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Field(max_length=256)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool = True
    # Where a reasoning model's thinking goes: "separate" (message.reasoning_content) or
    # "inline" (left in content, think tags and all). llama.cpp's names work too.
    reasoning_format: Literal["separate", "inline", "none", "deepseek", "auto"] | None = None
    # How much a reasoning model thinks: "none" turns thinking off (through the model's own
    # switch), the others set a budget of reasoning tokens (gateway/engine/request.py).
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's and SGLang's extra variables for the chat template (Qwen3's `enable_thinking`).
    chat_template_kwargs: (
        Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS)] | None
    ) = None
    # llama.cpp's: most reasoning tokens; -1 unbounded, 0 no thinking at all.
    thinking_budget_tokens: Annotated[int, Field(ge=-1, le=MAX_TOKENS)] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        clashes = sorted(set(v or {}) & RESERVED_TEMPLATE_KWARGS)
        if clashes:
            raise ValueError(
                f"{', '.join(map(repr, clashes))} cannot be set here: "
                f"{'they are' if len(clashes) > 1 else 'it is'} a parameter of "
                "apply_chat_template, not a template variable"
            )
        return v

    def _thinking(self) -> tuple[bool | None, int | None]:
        """Thinking on or off, and its budget: from reasoning_effort, then llama.cpp's
        thinking_budget_tokens, then an `enable_thinking` (or `thinking`) template variable,
        the most explicit last."""
        thinking, budget = effort(self.reasoning_effort)
        if self.thinking_budget_tokens is not None:
            if self.thinking_budget_tokens == 0:
                thinking, budget = False, None
            else:
                budget = None if self.thinking_budget_tokens < 0 else self.thinking_budget_tokens
        for key in ("enable_thinking", "thinking"):
            value = (self.chat_template_kwargs or {}).get(key)
            if isinstance(value, bool):
                thinking = value
        return thinking, budget

    @model_validator(mode="after")
    def _tool_choice(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, ToolChoiceFunction):
            names = [t.function.name for t in self.tools or []]
            if choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names '{choice.function.name}', which is not among the "
                    f"tools ({', '.join(names)})"
                )
        return self

    def _tools(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The tools the template sees, and what the model must do with them."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return None, None
        if isinstance(choice, ToolChoiceFunction):
            named = [t for t in self.tools if t.function.name == choice.function.name]
            return [t.as_template_tool() for t in named], "required"
        return [t.as_template_tool() for t in self.tools], choice or "auto"

    def asked(self) -> Any:
        return self.model_dump(exclude_none=True)["messages"]

    def generation_requests(self) -> list[GenerationRequest]:
        messages = [m.as_template_message() for m in self.messages]
        tools, tool_choice = self._tools()
        reasoning = {"none": "inline", "deepseek": "separate", "auto": "separate"}.get(
            self.reasoning_format or "", self.reasoning_format
        )
        common = self._common()  # once: it compiles response_format's grammar
        thinking, budget = self._thinking()
        return [
            GenerationRequest(
                kind="chat",
                messages=messages,
                max_tokens=self.max_completion_tokens or self.max_tokens,
                seed=seed,
                logprobs=self.logprobs,
                top_logprobs=(self.top_logprobs or 0) if self.logprobs else 0,
                tools=tools,
                tool_grammar=tool_call_grammar(tools) if tools else None,
                tool_choice=tool_choice,
                parallel_tool_calls=self.parallel_tool_calls,
                reasoning=reasoning,
                template_kwargs=dict(self.chat_template_kwargs or {}),
                thinking=thinking,
                reasoning_budget=budget,
                **common,
            )
            for seed in self._seeds(self.n)
        ]


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def asked(self) -> Any:
        return self.prompt

    def generation_requests(self) -> list[GenerationRequest]:
        # Choices are ordered prompt by prompt, n per prompt, as OpenAI orders them.
        common = self._common()
        return [
            GenerationRequest(
                kind="completion",
                prompt=prompt,
                max_tokens=self.max_tokens,
                seed=seed,
                logprobs=self.logprobs is not None,
                top_logprobs=self.logprobs or 0,
                **common,
            )
            for prompt in self.prompts
            for seed in self._seeds(self.n)
        ]


class LoadBody(_Body):
    model: Annotated[str, Field(min_length=1)]


class UnloadBody(LoadBody):
    force: bool = False
