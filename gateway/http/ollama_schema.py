"""Request bodies of Ollama's API (/api/*), validated with pydantic, and how each becomes the
service's neutral request. Unknown fields are ignored, as Ollama ignores them; a field that is
accepted either works or is refused with a 400 saying why."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from config.settings import parse_duration
from gateway.engine.grammar import grammar_for_text, tool_call_grammar
from gateway.engine.request import EmbeddingRequest, GenerateRequest, GenerationRequest, effort
from gateway.fields import MAX_TOKENS, Temperature, Tokens, TopP
from gateway.http.schemas import MAX_STOPS, KeepAlive, Tool

# Ollama's `think` levels (gpt-oss) as OpenAI's reasoning efforts.
THINK_LEVELS = ("low", "medium", "high")


def model_name(name: str) -> str:
    """Ollama's names carry a tag; `name:latest` is `name` here (other tags are part of the
    name: a profile may be called `llama:8b`)."""
    return name.removesuffix(":latest")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Body):
    """Ollama's `options` that map onto sampling here. Others (num_gpu, num_thread, mirostat,
    ...) are ignored, as they tune Ollama's runner, not the answer. Unset options take the
    profile's defaults, then the server's: not Ollama's (its repeat_penalty 1.1, temperature
    0.8)."""

    # -1: until the end (the server's max_tokens limit); -2: fill the context (the same here).
    num_predict: Annotated[int, Field(ge=-2, le=MAX_TOKENS)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    num_ctx: Tokens | None = None
    repeat_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None

    @field_validator("num_predict")
    @classmethod
    def _predict(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("must be positive, or -1 (no limit)")
        return v

    def sampling(self) -> dict[str, Any]:
        """The neutral request's fields for these options."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "max_tokens": self.num_predict if (self.num_predict or 0) > 0 else None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
            "min_p": self.min_p or None,
            "seed": self.seed,
            "stop": stops,
            "context_length": self.num_ctx,
            # 1 is "off" in Ollama's and mlx-lm's meaning alike.
            "repetition_penalty": self.repeat_penalty if self.repeat_penalty != 1 else None,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
        }


class _Generate(_Body):
    """What /api/chat and /api/generate share."""

    model: Annotated[str, Field(min_length=1)]
    stream: bool = True  # on unless asked otherwise, as in Ollama
    options: Options = Field(default_factory=Options)
    keep_alive: KeepAlive = None
    # "json", or a JSON schema the answer must follow (enforced while decoding).
    format: Literal["", "json"] | dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None

    @property
    def name(self) -> str:
        return model_name(self.model)

    @property
    def keep_alive_seconds(self) -> float | None:
        return parse_duration(self.keep_alive)

    def _grammar(self) -> str | None:
        if not self.format:
            return None
        if self.format == "json":
            return grammar_for_text('{"type": "json_object"}')
        return grammar_for_text(
            json.dumps({"type": "json_schema", "json_schema": {"schema": self.format}})
        )

    def _thinking(self) -> tuple[bool | None, int | None]:
        if isinstance(self.think, bool):
            return self.think, None
        return effort(self.think)

    def _request(self, choice: GenerationRequest, content: Any) -> GenerateRequest:
        return GenerateRequest(
            model=self.name,
            choices=[choice],
            keep_alive=self.keep_alive_seconds,
            stream=self.stream,
            content=lambda: content,
        )


class ToolCallFunction(_Body):
    name: Annotated[str, Field(min_length=1)]
    arguments: dict[str, Any] = Field(default_factory=dict)  # an object, not JSON text


class OllamaToolCall(_Body):
    id: str | None = None
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # which tool a `tool` message answers
    tool_call_id: str | None = None

    @field_validator("images")
    @classmethod
    def _no_images(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError("images are not supported: the models here read text only")
        return v

    def as_template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (gateway/http/schemas.py's Message does the
        same for OpenAI's): arguments as a mapping, the tool's name on a tool message."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id or f"call_{i}",
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for i, c in enumerate(self.tool_calls)
            ]
        if self.role == "tool":
            if self.tool_name is not None:
                message["name"] = self.tool_name
            if self.tool_call_id is not None:
                message["tool_call_id"] = self.tool_call_id
        return message


class ChatRequest(_Generate):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: Annotated[list[Tool], Field(max_length=256)] | None = None

    def generate_request(self) -> GenerateRequest:
        messages = [m.as_template_message() for m in self.messages]
        tools = [t.as_template_tool() for t in self.tools] if self.tools else None
        thinking, budget = self._thinking()
        choice = GenerationRequest(
            kind="chat",
            messages=messages,
            tools=tools,
            tool_grammar=tool_call_grammar(tools) if tools else None,
            tool_choice="auto" if tools else None,
            reasoning="separate",
            thinking=thinking,
            reasoning_budget=budget,
            grammar=self._grammar(),
            **self.options.sampling(),
        )
        return self._request(choice, messages)


# /api/generate fields Ollama has and this server refuses (when given), and why.
_REFUSED = {
    "suffix": "fill-in-the-middle (suffix) is not supported: the models here are served "
    "through their chat template, which has no place for a suffix",
    "template": "a request's own prompt template is not supported: the model's chat template "
    "is used (or send raw: true with the prompt already formatted)",
    "context": "context (token ids of an earlier answer) is not supported, and answers here "
    "carry none: send the conversation as messages to /api/chat",
    "images": "images are not supported: the models here read text only",
}


class GenerateBody(_Generate):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None

    @field_validator("suffix", "template", "context", "images")
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise ValueError(_REFUSED[info.field_name or ""])
        return v

    def generate_request(self) -> GenerateRequest:
        grammar = self._grammar()
        if self.raw:  # the prompt as it is: no template, no system prompt
            choice = GenerationRequest(
                kind="completion", prompt=self.prompt, grammar=grammar, **self.options.sampling()
            )
            return self._request(choice, self.prompt)
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.prompt})
        thinking, budget = self._thinking()
        choice = GenerationRequest(
            kind="chat",
            messages=messages,
            reasoning="separate",
            thinking=thinking,
            reasoning_budget=budget,
            grammar=grammar,
            **self.options.sampling(),
        )
        return self._request(choice, messages)


class ModelBody(_Body):
    """/api/show, /api/delete: a model by name (`name` is Ollama's older spelling)."""

    model: Annotated[str, Field(min_length=1)] | None = None
    name: Annotated[str, Field(min_length=1)] | None = None

    def target(self) -> str:
        given = self.model or self.name
        if given is None:
            raise ValueError("missing")
        return model_name(given)


class PullBody(ModelBody):
    stream: bool = True
    insecure: bool = False


class CopyBody(_Body):
    source: Annotated[str, Field(min_length=1)]
    destination: Annotated[str, Field(min_length=1)]


# Modelfile parameters a profile keeps, by their profile field.
CREATE_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "num_predict": "max_tokens",
    "num_ctx": "context_length",
}


class CreateBody(ModelBody):
    """/api/create, as far as it maps onto a profile: a name, the model it is made `from`, a
    system prompt and some default parameters."""

    from_: str | None = Field(None, alias="from")
    system: str | None = None
    parameters: dict[str, Any] | None = None
    stream: bool = True
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    template: str | None = None
    messages: list[dict[str, Any]] | None = None
    license: str | list[str] | None = None

    def refused(self) -> str | None:
        """Why this create cannot be a profile, or None if it can."""
        why = {
            "files": "models are not built from uploaded files here: download one with "
            "/api/pull (from the Hugging Face hub) or put its folder in a models folder",
            "adapters": "LoRA adapters are not supported",
            "quantize": "quantizing is not done here: pull a quantized MLX model instead "
            "(mlx-community has most models in 4 and 8 bits)",
            "template": "a profile cannot replace the model's chat template",
            "messages": "a profile cannot hold a conversation",
        }
        for field, reason in why.items():
            if getattr(self, field):
                return f"'{field}' cannot be used: {reason}."
        if not self.from_:
            return "'from' is required: the model (or profile) the new one is made from."
        unknown = sorted(set(self.parameters or {}) - set(CREATE_PARAMETERS))
        if unknown:
            return (
                f"parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"cannot be kept by a profile; it keeps {', '.join(CREATE_PARAMETERS)}."
            )
        return None

    def profile_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            CREATE_PARAMETERS[k]: v for k, v in (self.parameters or {}).items()
        }
        if self.system is not None:
            fields["system_prompt"] = self.system
        return fields


class EmbedBody(_Body):
    """/api/embed: one text or a list of them; inputs over the context are cut (`truncate`,
    on by default as in Ollama) and the vectors are normalised."""

    model: Annotated[str, Field(min_length=1)]
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: Tokens | None = None
    options: Options = Field(default_factory=Options)
    keep_alive: KeepAlive = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        return self.input

    def embedding_request(self) -> EmbeddingRequest:
        texts = self.texts()
        return EmbeddingRequest(
            model=model_name(self.model),
            inputs=list(texts),
            dimensions=self.dimensions,
            truncate=self.truncate,
            keep_alive=parse_duration(self.keep_alive),
            content=lambda: texts,
        )


class EmbeddingsBody(_Body):
    """/api/embeddings, Ollama's older endpoint: one `prompt`, its vector not normalised."""

    model: Annotated[str, Field(min_length=1)]
    prompt: str = ""
    options: Options = Field(default_factory=Options)
    keep_alive: KeepAlive = None

    def embedding_request(self) -> EmbeddingRequest:
        prompt = self.prompt
        return EmbeddingRequest(
            model=model_name(self.model),
            inputs=[prompt],
            normalize=False,
            keep_alive=parse_duration(self.keep_alive),
            content=lambda: [prompt],
        )
