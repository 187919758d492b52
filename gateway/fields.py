"""Bounded field types, each defined once and shared by the /v1 request bodies (schemas.py),
profiles (profiles.py) and the MCP tools' parameters (mcp_tools/server.py), so the HTTP and MCP
faces accept exactly the same values. Every number is finite and fits sqlite's 64-bit integers;
every string and list has a length limit."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_TOKENS = 2**24  # 16M tokens: beyond any model's context
MAX_TTL_SECONDS = 365 * 24 * 3600  # a year; 0 already means "keep it loaded"
MAX_NAME_CHARS = 128
MAX_ALIASES = 32
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_SYSTEM_PROMPT_CHARS = 256 * 1024
MAX_DESCRIPTION_CHARS = 4096

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Seconds = Annotated[float, Field(ge=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)]
ModelRef = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]
SystemPrompt = Annotated[str, Field(max_length=MAX_SYSTEM_PROMPT_CHARS)]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION_CHARS)]
