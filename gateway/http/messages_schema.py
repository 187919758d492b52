"""Request bodies of Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens),
validated with pydantic and turned into the service's neutral request.

Unknown fields are ignored: Claude Code sends many (`context_management`, `metadata`,
`cache_control` on any block, `anthropic-beta` features). Tools that are not custom tools (server
tools such as `web_search_20250305`, Anthropic-defined client tools) are left out of the prompt,
never refused. Images and documents are refused: the models served here read text only.

How a conversation reaches the chat template, in Hugging Face's message convention:
- `system` (a string or text blocks) and any `role: "system"` message inside `messages` become
  one leading system message (templates expect it first, and some refuse it anywhere else);
- an assistant's `tool_use` blocks become its `tool_calls` (arguments as a mapping), its text the
  message's content ("" when it has none, as the OpenAI face passes it);
- earlier `thinking` blocks become the assistant message's `reasoning_content`, which templates
  that keep earlier reasoning (Qwen3's, DeepSeek's) read and the others ignore;
  `redacted_thinking` (encrypted by Anthropic, meaningless here) is dropped;
- each `tool_result` block becomes a `tool` message with its `tool_call_id`, in order; text
  around them in the same user message becomes user messages in place;
- several text blocks of one message are joined by a blank line.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.engine.grammar import grammar_for_text, tool_call_grammar
from gateway.engine.request import GenerateRequest, GenerationRequest, effort
from gateway.errors import InvalidRequest
from gateway.fields import MAX_TOKENS, Temperature, Tokens, TopP

MAX_STOPS = 16
MAX_TOOLS = 256
JOIN = "\n\n"  # between text blocks of one message


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Content blocks ---------------------------------------------------------------------------------


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class MediaBlock(_Body):
    """An image or a document: parsed so that the refusal can say where it is and why."""

    type: Literal["image", "document"]


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: Annotated[str, Field(min_length=1)]
    input: dict[str, Any] = Field(default_factory=dict)


ResultPart = Annotated[TextBlock | MediaBlock, Field(discriminator="type")]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] | None = None
    is_error: bool = False


class ThinkingBlock(_Body):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Body):
    type: Literal["redacted_thinking"]


# Each block type: pydantic names a union's member by it in an error's location.
BLOCK_TYPES = (
    "text",
    "image",
    "document",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
)
Block = Annotated[
    TextBlock | MediaBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class InputMessage(_Body):
    # "system" is not Anthropic's, but Claude Code sends one inside `messages`.
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


# Tools, thinking, output ------------------------------------------------------------------------


class ToolDef(_Body):
    type: str | None = None  # absent or "custom": a tool the model may call; others are ignored
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    @property
    def custom(self) -> bool:
        return self.type in (None, "custom")

    @model_validator(mode="after")
    def _schema_given(self) -> ToolDef:
        if self.custom and self.input_schema is None:
            raise ValueError(f"tool '{self.name}' needs an input_schema")
        return self

    def as_template_tool(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.input_schema
        return {"type": "function", "function": function}


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs the tool's name")
        return self


class ThinkingConfig(_Body):
    # "enabled" (with a budget), "disabled", or a way of thinking without one ("adaptive", which
    # Claude Code sends, "between_tools", and whatever comes next): all of those switch it on.
    type: Annotated[str, Field(min_length=1)]
    budget_tokens: Tokens | None = None
    display: str | None = None  # "omitted": thinking blocks come back empty

    @model_validator(mode="after")
    def _budget(self) -> ThinkingConfig:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type 'enabled' needs budget_tokens")
        return self


class OutputFormat(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")

    def grammar(self) -> str | None:
        response_format = {"type": "json_schema", "json_schema": {"schema": self.schema_}}
        return grammar_for_text(json.dumps(response_format))


class OutputConfig(_Body):
    effort: str | None = None  # "low" | "medium" | "high" | "max": a thinking budget here
    format: OutputFormat | None = None


# The request ------------------------------------------------------------------------------------


class MessagesRequest(_Body):
    model: Annotated[str, Field(min_length=1)]
    max_tokens: Tokens
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's spelling
    metadata: dict[str, Any] | None = None  # user_id: accepted, not used
    stream: bool | None = False

    @model_validator(mode="after")
    def _tool_choice(self) -> MessagesRequest:
        choice = self.tool_choice
        if choice is not None and choice.type == "any" and not self._custom_tools():
            raise ValueError("tool_choice 'any' needs tools")
        if choice is not None and choice.type == "tool":
            names = [t.name for t in self._custom_tools()]
            if choice.name not in names:
                among = f"among the tools ({', '.join(names)})" if names else "given: no tools"
                raise ValueError(f"tool_choice names '{choice.name}', which is not {among}")
        return self

    @property
    def omit_thinking(self) -> bool:
        """Thinking happens, but its blocks come back empty (`display: "omitted"`)."""
        return self.thinking is not None and self.thinking.display == "omitted"

    def _custom_tools(self) -> list[ToolDef]:
        return [t for t in self.tools or [] if t.custom]

    def _tools(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The tools the template sees, and what the model must do with them."""
        tools, choice = self._custom_tools(), self.tool_choice
        kind = choice.type if choice is not None else "auto"
        if not tools or kind == "none":
            return None, None
        if kind == "tool":
            assert choice is not None
            tools = [t for t in tools if t.name == choice.name]
        return [t.as_template_tool() for t in tools], "auto" if kind == "auto" else "required"

    def _thinking(self) -> tuple[bool | None, int | None]:
        """(thinking, reasoning_budget): `output_config.effort` bounds thinking that has no
        budget of its own."""
        thinking = self.thinking
        if thinking is None:
            return None, None
        if thinking.type == "disabled":
            return False, None
        budget = thinking.budget_tokens
        if budget is None and self.output_config is not None:
            budget = effort(self.output_config.effort)[1]
        return True, budget

    def _grammar(self) -> str | None:
        output = self.output_config.format if self.output_config else None
        output = output or self.output_format
        return output.grammar() if output is not None else None

    def _media(self) -> tuple[str, str] | None:
        """Where the first image or document block is, and its type."""
        for i, m in enumerate(self.messages):
            for j, block in enumerate(m.content if isinstance(m.content, list) else []):
                if isinstance(block, MediaBlock):
                    return f"messages.{i}.content.{j}", block.type
                if isinstance(block, ToolResultBlock) and isinstance(block.content, list):
                    for k, part in enumerate(block.content):
                        if isinstance(part, MediaBlock):
                            return f"messages.{i}.content.{j}.content.{k}", part.type
        return None

    def template_messages(self) -> list[dict[str, Any]]:
        media = self._media()
        if media is not None:
            where, kind = media
            raise InvalidRequest(
                f"'{self.model}' cannot read the {kind} at {where}: the models this server "
                "runs read text only (no vision). Send the content as text.",
                param=where,
            )
        system = [] if self.system is None else [_text(self.system)]
        system += [_text(m.content, i) for i, m in enumerate(self.messages) if m.role == "system"]
        out: list[dict[str, Any]] = []
        if system:
            out.append({"role": "system", "content": JOIN.join(system)})
        for i, m in enumerate(self.messages):
            if m.role == "assistant":
                out.append(_assistant(m.content, i))
            elif m.role == "user":
                out += _user(m.content, i)
        return out

    def generation_request(self) -> GenerationRequest:
        tools, tool_choice = self._tools()
        thinking, budget = self._thinking()
        choice = self.tool_choice
        return GenerationRequest(
            kind="chat",
            messages=self.template_messages(),
            max_tokens=self.max_tokens,
            clamp_max_tokens=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,
            stop=[s for s in self.stop_sequences or [] if s],
            tools=tools,
            tool_grammar=tool_call_grammar(tools) if tools else None,
            tool_choice=tool_choice,
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            reasoning="separate",  # thinking goes to thinking blocks, never into the text
            grammar=self._grammar(),
            thinking=thinking,
            reasoning_budget=budget,
        )

    def generate_request(self) -> GenerateRequest:
        """The service's protocol-neutral request for this body."""
        choice = self.generation_request()
        return GenerateRequest(
            model=self.model,
            choices=[choice],
            stream=bool(self.stream),
            content=lambda: choice.messages,
        )


class CountTokensRequest(MessagesRequest):
    """count_tokens takes a message's input: max_tokens is not needed (nor used)."""

    max_tokens: Tokens | None = None  # type: ignore[assignment]


# Messages into template messages ----------------------------------------------------------------


def _text(content: str | list[TextBlock] | list[Block], message: int | None = None) -> str:
    """The text of a system prompt or a system message; anything but text is refused."""
    if isinstance(content, str):
        return content
    where = "system" if message is None else f"messages.{message}.content"
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, TextBlock):
            raise InvalidRequest(
                f"{where}.{j}: a system message takes text blocks only, not '{block.type}'.",
                param=f"{where}.{j}",
            )
        parts.append(block.text)
    return JOIN.join(parts)


def _assistant(content: str | list[Block], i: int) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thoughts.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            # Templates (Hugging Face's convention) take arguments as a mapping.
            function = {"name": block.name, "arguments": block.input}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ToolResultBlock):
            raise InvalidRequest(
                f"{where}: tool_result blocks belong in a user message, after the assistant "
                "message with the tool_use they answer.",
                param=where,
            )
    message: dict[str, Any] = {"role": "assistant", "content": JOIN.join(texts)}
    if thoughts:
        message["reasoning_content"] = JOIN.join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def _user(content: str | list[Block], i: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append({"role": "user", "content": JOIN.join(texts)})
            texts.clear()

    for j, block in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            flush()
            out.append(_tool_message(block, where))
        elif isinstance(block, ToolUseBlock):
            raise InvalidRequest(
                f"{where}: tool_use blocks belong in an assistant message.", param=where
            )
        # thinking in a user message: nothing to say to the model
    flush()
    return out or [{"role": "user", "content": ""}]


def _tool_message(block: ToolResultBlock, where: str) -> dict[str, Any]:
    content = block.content
    if isinstance(content, list):
        content = JOIN.join(p.text for p in content if isinstance(p, TextBlock))
    text = content or ""
    if block.is_error:  # templates have no error flag: the model reads it
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}
