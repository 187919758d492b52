"""Request bodies of the OpenAI Responses API (`POST /v1/responses`,
`POST /v1/responses/input_tokens`), validated with pydantic, and their translation into the
service's neutral request: input items become the chat template's messages, Responses' flat
function tools the template's tools, `text.format` a grammar, `reasoning.effort` a thinking
switch and budget.

Tools and input items of types this server cannot use (Codex sends `web_search`, `local_shell`,
`custom`, `namespace` tools) are accepted and left out of the prompt, never refused: a client
offers them without knowing what a server can do. Content it cannot read (images, files, audio)
is refused, as the model would otherwise answer without it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from gateway.engine.grammar import grammar_for_text, tool_call_grammar
from gateway.engine.request import GenerateRequest, GenerationRequest, effort
from gateway.errors import InvalidRequest
from gateway.fields import Temperature, Tokens, TopP
from gateway.http.schemas import FunctionCall, FunctionDef, Message, ToolCall, json_object_text

MAX_ITEMS = 4096
MAX_TOOLS = 256
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _tag(kind: str) -> str:
    """A union member's tag. Pydantic puts it in the location of an error; in brackets, the
    error's `param` (gateway/http/v1.py) leaves it out and names the field path only."""
    return f"[{kind}]"


def _by_type(known: tuple[str, ...], default: str | None = None) -> Callable[[Any], str | None]:
    """A discriminator: the value's `type` if it is one of `known`, else "other"; a string
    is a "mode" (tool_choice's "auto")."""

    def kind(value: Any) -> str | None:
        if isinstance(value, dict):
            t = value.get("type", default)
        elif isinstance(value, str):
            return _tag("mode") if "mode" in known else None
        else:
            t = getattr(value, "type", None)
        return _tag(t if t in known else "other") if t is not None else None

    return kind


# Input items ------------------------------------------------------------------------------------


class ContentPart(_Body):
    """A part of a message's content: text of some kind."""

    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _readable(self) -> ContentPart:
        if self.type not in TEXT_PARTS:
            raise ValueError(
                f"'{self.type}' content is not supported: the models here read text only"
            )
        if self.type == "refusal":
            self.text, self.type = self.refusal or "", "output_text"
        if self.text is None:
            raise ValueError(f"a '{self.type}' part needs its 'text'")
        return self


def _as_parts(value: Any) -> Any:
    """Plain text content, as EasyInputMessage sends it, as one text part."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


def _text(parts: list[ContentPart]) -> str:
    return "".join(p.text or "" for p in parts)


class MessageItem(_Body):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[list[ContentPart], BeforeValidator(_as_parts)]

    @property
    def text(self) -> str:
        return _text(self.content)

    def stored(self) -> dict[str, Any]:
        kind = "output_text" if self.role == "assistant" else "input_text"
        extra: dict[str, Any] = {"annotations": []} if kind == "output_text" else {}
        return {
            "id": self.id or new_id("msg"),
            "type": "message",
            "role": self.role,
            "content": [{"type": kind, "text": p.text, **extra} for p in self.content],
            "status": "completed",
        }


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    id: str | None = None
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: Annotated[str, AfterValidator(json_object_text)]

    def stored(self) -> dict[str, Any]:
        return {
            "id": self.id or new_id("fc"),
            "type": "function_call",
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "status": "completed",
        }


class OutputPart(_Body):
    """A part of a tool's output. What is not text is named in its place rather than refused:
    a conversation that carries it (Codex resends its history every turn) would otherwise
    be refused for good, and the model can still be told that something was there."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @property
    def readable(self) -> str:
        if self.type in TEXT_PARTS and self.text is not None:
            return self.text
        return f"[{self.type}: not shown, this model reads text only]"


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[OutputPart]

    @property
    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.readable for p in self.output)

    def stored(self) -> dict[str, Any]:
        output: Any = self.output
        if not isinstance(output, str):
            output = [p.model_dump(exclude_none=True) for p in output]
        return {
            "id": self.id or new_id("fco"),
            "type": "function_call_output",
            "call_id": self.call_id,
            "output": output,
            "status": "completed",
        }


class ReasoningText(_Body):
    type: str = "reasoning_text"
    text: str


class ReasoningItem(_Body):
    """Earlier thinking, given back. It goes to the template with the assistant turn it
    belongs to (as `reasoning_content`, the name chat templates that render past thinking
    read; those that do not, drop it), or nowhere when no assistant turn follows."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None

    @property
    def text(self) -> str:
        parts = self.content or self.summary
        return "\n".join(p.text for p in parts)

    def stored(self) -> dict[str, Any]:
        item = self.model_dump(exclude_none=True)
        return {**item, "id": self.id or new_id("rs")}


class OtherItem(_Body):
    """An item of a type this server does not produce (a hosted tool's call, say): kept with
    the conversation, left out of the prompt."""

    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _not_a_reference(cls, v: str) -> str:
        if v == "item_reference":
            raise ValueError(
                "item references are not supported: send the items themselves, or continue "
                "a stored response with previous_response_id"
            )
        return v

    def stored(self) -> dict[str, Any]:
        return self.model_dump()


ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
InputItem = Annotated[
    Annotated[MessageItem, Tag(_tag("message"))]
    | Annotated[FunctionCallItem, Tag(_tag("function_call"))]
    | Annotated[FunctionCallOutputItem, Tag(_tag("function_call_output"))]
    | Annotated[ReasoningItem, Tag(_tag("reasoning"))]
    | Annotated[OtherItem, Tag(_tag("other"))],
    # EasyInputMessage: an item with a role and no type is a message.
    Discriminator(
        _by_type(ITEM_TYPES, default="message"),
        custom_error_type="invalid_item",
        custom_error_message="an input item must be an object",
    ),
]


_ITEMS: TypeAdapter[Any] = TypeAdapter(InputItem)  # stored items, read back


def _as_items(value: Any) -> Any:
    """`input` as plain text is one user message; null, none."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [] if value is None else value


def template_messages(instructions: str | None, items: list[Any]) -> list[dict[str, Any]]:
    """The chat template's messages for a conversation's items, as the Chat Completions face
    would build them (gateway/http/schemas.py) from the equivalent messages: an assistant
    message and the function calls right after it are one assistant turn, a call's output a
    `tool` message. Reasoning goes with the assistant turn that follows it."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append(Message(role="system", content=instructions).as_template_message())
    turn: Message | None = None  # the assistant turn being put together
    thought: list[str] = []  # its reasoning
    pending: list[str] = []  # reasoning for whatever the model did next

    def close() -> None:
        nonlocal turn
        if turn is not None:
            message = turn.as_template_message()
            if thought:
                message["reasoning_content"] = "\n".join(thought)
            messages.append(message)
        turn = None
        thought.clear()

    def take_pending() -> None:
        thought.extend(pending)
        pending.clear()

    for item in items:
        if isinstance(item, ReasoningItem):
            if item.text:  # Codex sends its reasoning items back without their text
                pending.append(item.text)
        elif isinstance(item, FunctionCallItem):
            if turn is None:
                turn = Message(role="assistant", tool_calls=[])
            take_pending()
            call = FunctionCall(name=item.name, arguments=item.arguments)
            turn.tool_calls = [*(turn.tool_calls or []), ToolCall(id=item.call_id, function=call)]
        elif isinstance(item, MessageItem) and item.role == "assistant":
            close()
            turn = Message(role="assistant", content=item.text)
            take_pending()
        elif isinstance(item, MessageItem | FunctionCallOutputItem):
            close()
            pending.clear()  # thinking that led to no answer
            if isinstance(item, MessageItem):
                message = Message(role=item.role, content=item.text)
            else:
                message = Message(role="tool", tool_call_id=item.call_id, content=item.text)
            messages.append(message.as_template_message())
    close()
    return messages


# Tools ------------------------------------------------------------------------------------------


class FunctionTool(FunctionDef):
    """Responses' function tool: Chat Completions' function, flat, with its type."""

    type: Literal["function"]

    def as_template_tool(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": self.model_dump(exclude_none=True, exclude={"type"}),
        }


class OtherTool(_Body):
    """A hosted or custom tool (web_search, local_shell, custom, namespace, mcp, ...): echoed
    back, never offered to the model."""

    model_config = ConfigDict(extra="allow")
    type: str


ToolItem = Annotated[
    Annotated[FunctionTool, Tag(_tag("function"))] | Annotated[OtherTool, Tag(_tag("other"))],
    Discriminator(
        _by_type(("function",)),
        custom_error_type="invalid_tool",
        custom_error_message="a tool must be an object with a 'type'",
    ),
]


class NamedTool(_Body):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]


class AllowedTool(_Body):
    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None


class AllowedTools(_Body):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[AllowedTool]


class OtherChoice(_Body):
    """A hosted tool forced (`{"type": "web_search_preview"}`, `mcp`, `custom`): those tools
    are not offered here, so the model chooses among the function tools instead."""

    model_config = ConfigDict(extra="allow")
    type: str


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag(_tag("mode"))]
    | Annotated[NamedTool, Tag(_tag("function"))]
    | Annotated[AllowedTools, Tag(_tag("allowed_tools"))]
    | Annotated[OtherChoice, Tag(_tag("other"))],
    Discriminator(
        _by_type(("mode", "function", "allowed_tools")),
        custom_error_type="invalid_tool_choice",
        custom_error_message="tool_choice must be 'none', 'auto', 'required' or an object",
    ),
]


# Text format and reasoning ----------------------------------------------------------------------


class TextFormat(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a 'json_schema' format needs its 'schema'")
        return self

    def grammar(self) -> str | None:
        """The grammar the answer must follow (gateway/engine/grammar.py): a bad schema is a
        400 naming text.format."""
        fmt: dict[str, Any] = {"type": self.type}
        if self.type == "json_schema":
            fmt["json_schema"] = {"schema": self.schema_}
        try:
            return grammar_for_text(json.dumps(fmt))
        except InvalidRequest as e:
            raise InvalidRequest(e.message, param="text.format") from None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # its old name


Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


# The request ------------------------------------------------------------------------------------


class ResponseCreate(_Body):
    model: Annotated[str, Field(min_length=1)]
    input: Annotated[list[InputItem], Field(max_length=MAX_ITEMS), BeforeValidator(_as_items)] = []
    instructions: str | None = None
    tools: Annotated[list[ToolItem], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: bool = True
    previous_response_id: Annotated[str, Field(min_length=1)] | None = None
    stream: bool = False
    # Accepted and echoed: `include` asks for what cannot be made here (encrypted reasoning)
    # or is not offered (logprobs); the prompt cache works without a key; truncation "auto"
    # would drop items from the start of a conversation that does not fit, which this
    # server refuses instead (400) so that nothing is dropped without a word.
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    metadata: Metadata | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None

    @field_validator("background")
    @classmethod
    def _foreground(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("background responses are not supported: stream the response instead")
        return v

    @field_validator("conversation", "prompt")
    @classmethod
    def _not_supported(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError(
                "not supported: send the conversation's items as input, or continue a "
                "stored response with previous_response_id"
            )
        return v

    @model_validator(mode="after")
    def _tool_choice(self) -> ResponseCreate:
        # Raised as the service's error itself, so that it names its parameter.
        names = [t.name for t in self._functions()]
        choice = self.tool_choice
        if choice == "required" and not names:
            raise InvalidRequest(
                "tool_choice 'required' needs function tools.", param="tool_choice"
            )
        wanted: list[str] = []
        if isinstance(choice, NamedTool):
            wanted = [choice.name]
        elif isinstance(choice, AllowedTools):
            wanted = [t.name or "" for t in choice.tools if t.type == "function"]
        for name in wanted:
            if name not in names:
                raise InvalidRequest(
                    f"tool_choice names '{name}', which is not among the function tools "
                    f"({', '.join(names) or 'none'}).",
                    param="tool_choice",
                )
        return self

    def _functions(self) -> list[FunctionTool]:
        return [t for t in self.tools or [] if isinstance(t, FunctionTool)]

    def _tools(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The tools the template sees, and what the model must do with them."""
        functions, choice = self._functions(), self.tool_choice
        mode = "auto"
        if isinstance(choice, NamedTool):
            functions, mode = [t for t in functions if t.name == choice.name], "required"
        elif isinstance(choice, AllowedTools):
            allowed = {t.name for t in choice.tools if t.type == "function"}
            functions, mode = [t for t in functions if t.name in allowed], choice.mode
        elif choice == "required":
            mode = "required"
        if not functions or choice == "none":
            return None, None
        return [t.as_template_tool() for t in functions], mode

    def items(self) -> list[dict[str, Any]]:
        """This request's input items as they are stored: with ids, in their full form."""
        return [item.stored() for item in self.input]

    def generate_request(self, history: list[dict[str, Any]] | None = None) -> GenerateRequest:
        """The service's neutral request: `history` is a stored response's items (its input,
        predecessors' included, then its output) that this request continues."""
        earlier = [_ITEMS.validate_python(i) for i in history or []]
        items = [*earlier, *self.input]
        messages = template_messages(self.instructions, items)
        if not messages:
            raise InvalidRequest("The request has no input.", param="input")
        tools, tool_choice = self._tools()
        thinking, budget = effort(self.reasoning.effort if self.reasoning else None)
        fmt = self.text.format if self.text else None
        choice = GenerationRequest(
            kind="chat",
            messages=messages,
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            tools=tools,
            tool_choice=tool_choice,
            tool_grammar=tool_call_grammar(tools) if tools else None,
            parallel_tool_calls=self.parallel_tool_calls,
            reasoning="separate",  # Responses has its own place for it: reasoning items
            grammar=fmt.grammar() if fmt else None,
            thinking=thinking,
            reasoning_budget=budget,
        )
        return GenerateRequest(
            model=self.model,
            choices=[choice],
            stream=self.stream,
            content=lambda: [*(history or []), *self.items()],
        )

    def echo(self) -> dict[str, Any]:
        """The request's parameters as a response object repeats them."""
        fmt = self.text.format if self.text else None
        reasoning = self.reasoning or ReasoningConfig()
        choice = self.tool_choice
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": {
                "effort": reasoning.effort,
                "summary": reasoning.summary or reasoning.generate_summary,
            },
            "safety_identifier": self.safety_identifier,
            "service_tier": self.service_tier or "default",
            "store": self.store,
            "temperature": self.temperature,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"},
                "verbosity": (self.text.verbosity if self.text else None) or "medium",
            },
            "tool_choice": choice.model_dump() if isinstance(choice, _Body) else choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
            "top_p": self.top_p,
            "truncation": self.truncation or "disabled",
            "user": self.user,
            "background": False,
        }


class InputTokensRequest(ResponseCreate):
    """`POST /v1/responses/input_tokens`: a create's body, counted instead of answered. The
    model may be left out when a previous response says which."""

    model: Annotated[str, Field(min_length=1)] | None = None  # type: ignore[assignment]
