"""The MCP face of mlx-manager: tools and resources that are thin wrappers over the Service (the
same service layer the HTTP routes and the CLI use). A ServiceError becomes a tool error whose
message a person can act on."""

# No `from __future__ import annotations`: the SDK reads these signatures to build the schemas.

import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from gateway.catalog.profiles import FIELDS, Profile
from gateway.errors import ServiceError
from gateway.fields import Temperature, Tokens
from gateway.service.service import USAGE_GROUPS, Service

PROFILE_FIELDS = {"name", *FIELDS}

INSTRUCTIONS = """mlx-manager serves local MLX language models behind an OpenAI-compatible API.
Name a model by any name /v1 accepts: a profile or alias, a local model id (`org/name` for the
Hugging Face cache), or an absolute path. Typical flow: list_models or model_info to find a model
that fits system_info's memory budget, create_profile with the defaults you want, load_model,
then chat with the profile's name (or point an OpenAI client at /v1 with it)."""

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

ModelName = Annotated[
    str, Field(description="A profile, alias, local model id (org/name) or absolute path.")
]
ProfileName = Annotated[str, Field(description="The profile's unique name.")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


def _errors_as_tool_errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except ServiceError as e:
            raise ToolError(e.message) from None

    return wrapper  # type: ignore[return-value]


def _given(**fields: Any) -> dict[str, Any]:
    """The profile fields the caller set (None means "leave as it is")."""
    return {k: v for k, v in fields.items() if k in PROFILE_FIELDS and v is not None}


def _profile_fields(partial: bool) -> Callable[[F], F]:
    """Make a profile tool's parameters Profile's fields, with their bounds and descriptions:
    MCP takes exactly what POST /admin/profiles takes, from one schema. `partial` (updates):
    every field but the name is optional, None meaning "leave it as it is"."""

    def parameter(name: str) -> inspect.Parameter:
        field = Profile.model_fields[name]
        hint: Any = Annotated[
            field.annotation, *field.metadata, Field(description=field.description)
        ]
        if partial and name != "name":
            hint, default = hint | None, None
        elif field.is_required():
            default = inspect.Parameter.empty
        else:
            default = field.get_default(call_default_factory=True)
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint
        )

    def with_fields(fn: F) -> F:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        fields = [parameter(n) for n in Profile.model_fields if n not in {p.name for p in own}]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*fields, *own], return_annotation=dict[str, Any]
        )
        return fn

    return with_fields


def _key_name(ctx: Context) -> str | None:
    """The API key an HTTP MCP session authenticated with (gateway/http/middleware.py); None
    over stdio."""
    try:
        request = ctx.request_context.request
    except (AttributeError, ValueError, LookupError):
        return None
    scope = getattr(request, "scope", None)
    return scope.get("state", {}).get("api_key") if isinstance(scope, dict) else None


def _package_version() -> str:
    try:
        return version("mlx-manager")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def build_mcp(service: Service) -> MCPServer:
    mcp = MCPServer(name="mlx-manager", instructions=INSTRUCTIONS, version=_package_version())
    # This server has no prompts. The SDK registers the prompt methods anyway and advertises
    # the capability for any registered method; a client that then asked for a prompt got
    # an internal error and the server a traceback. Without them it is "method not found".
    for method in ("prompts/list", "prompts/get"):
        mcp._lowlevel_server._request_handlers.pop(method, None)

    def tool(fn: F) -> F:
        # The description is the docstring without its source indentation.
        mcp.tool(description=inspect.cleandoc(fn.__doc__ or ""))(_errors_as_tool_errors(fn))
        return fn

    # Models -----------------------------------------------------------------------------------

    @tool
    async def list_models() -> dict[str, Any]:
        """Local models (Hugging Face cache and model folders) with size, family, quantization,
        context length and whether each is loaded."""
        return {"models": await service.list_models()}

    @tool
    async def model_info(model: ModelName) -> dict[str, Any]:
        """One model inspected from its files: family, architecture, parameters, quantization,
        context length, vocabulary, size, estimated memory and whether it fits the budget,
        chat template, tool-calling and reasoning hints."""
        return await service.model_info(model)

    @tool
    async def search_models(
        query: Annotated[str, Field(description="Text to search for, e.g. 'qwen 4bit'.")],
        author: Annotated[
            str | None, Field(description="Organization, e.g. mlx-community (default: all).")
        ] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="Results at most.")] = 20,
    ) -> dict[str, Any]:
        """Search the Hugging Face hub for MLX models, most downloaded first, with size, whether
        each is already downloaded and whether it fits the memory budget."""
        return {"models": await service.search_models(query, author, limit)}

    @tool
    async def download_model(
        model: Annotated[str, Field(description="Hub id, e.g. mlx-community/Qwen3-0.6B-4bit.")],
        ctx: Context,
    ) -> dict[str, Any]:
        """Download a model into the Hugging Face cache (only the files serving needs), with
        progress notifications. A download already running for it is joined. Interrupted
        downloads resume."""

        async def progress(job: dict[str, Any]) -> None:
            await ctx.report_progress(
                job["bytes_done"], job["bytes_total"] or None, f"{job['model']}: {job['status']}"
            )

        result = await service.download_model(model, progress)
        if result["status"] != "done":
            raise ServiceError(f"Download of {model} {result['status']}: {result['error']}")
        return result

    @tool
    async def list_downloads() -> dict[str, Any]:
        """Download jobs of this server with status, bytes done/total, rate and ETA."""
        return {"downloads": await service.download_status()}

    @tool
    async def cancel_download(
        id: Annotated[str, Field(description="The job id from download_model/list_downloads.")],
    ) -> dict[str, Any]:
        """Cancel a running download; files already complete are kept for a later resume."""
        return await service.cancel_download(id)

    @tool
    async def delete_model(
        model: ModelName,
        unload: Annotated[bool, Field(description="Unload it first if it is loaded.")] = False,
    ) -> dict[str, Any]:
        """Delete a downloaded model from the Hugging Face cache (every revision) and report
        the space freed. Refused while the model is loaded unless unload is true."""
        return await service.delete_model(model, unload)

    # Profiles ---------------------------------------------------------------------------------

    @tool
    async def list_profiles() -> dict[str, Any]:
        """Every profile with its model and defaults."""
        return {"profiles": await service.list_profiles()}

    @tool
    async def get_profile(name: ProfileName) -> dict[str, Any]:
        """One profile."""
        return await service.get_profile(name)

    @tool
    @_profile_fields(partial=False)
    async def create_profile(**fields: Any) -> dict[str, Any]:
        """Create a profile: a name usable as `model` in /v1 requests, bound to a model and its
        defaults. Requests may still override each default."""
        return await service.create_profile(_given(**fields))

    @tool
    @_profile_fields(partial=True)
    async def update_profile(
        clear: Annotated[
            list[str] | None, Field(description="Fields to reset to unset, e.g. ['temperature'].")
        ] = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Change only the fields given (partial update); `clear` resets fields."""
        name = fields.pop("name")
        return await service.update_profile(name, _given(**fields), clear or [])

    @tool
    async def delete_profile(name: ProfileName) -> dict[str, Any]:
        """Delete a profile (its model stays)."""
        return {"deleted": name, "profile": await service.delete_profile(name)}

    # Workers ----------------------------------------------------------------------------------

    @tool
    async def list_loaded() -> dict[str, Any]:
        """Loaded models: state, memory, uptime, idle time, TTL left, queue, requests served."""
        return {"loaded": await service.list_loaded(), **await service.memory()}

    @tool
    async def load_model(model: ModelName, ctx: Context) -> dict[str, Any]:
        """Load a model now and keep it loaded (its idle TTL starts when loaded). Reports
        progress while it loads."""

        async def progress(state: str, elapsed: float, message: str) -> None:
            await ctx.report_progress(elapsed, None, message)

        return await service.load(model, progress)

    @tool
    async def unload_model(
        model: ModelName,
        force: Annotated[
            bool, Field(description="Cancel running requests instead of letting them finish.")
        ] = False,
    ) -> dict[str, Any]:
        """Unload a model once its running requests finish (or at once with force). Unloading
        a model that is not loaded succeeds and says so."""
        return await service.unload(model, force)

    @tool
    async def chat(
        model: ModelName,
        messages: Annotated[list[ChatMessage], Field(description="The conversation.")],
        ctx: Context,
        temperature: Annotated[
            Temperature | None, Field(description="0-2; default: the profile's or 1.")
        ] = None,
        max_tokens: Annotated[Tokens | None, Field(description="Tokens at most.")] = None,
    ) -> dict[str, Any]:
        """Send messages to a model or profile and get its reply (and its reasoning and tool
        calls, when it makes any) with token usage."""
        return await service.chat(
            model, [m.model_dump() for m in messages], temperature, max_tokens, _key_name(ctx)
        )

    # Observability ----------------------------------------------------------------------------

    @tool
    async def request_log(
        model: Annotated[
            str | None, Field(description="Only this model or profile's requests.")
        ] = None,
        key: Annotated[str | None, Field(description="Only this API key's requests.")] = None,
        status: Annotated[
            int | None, Field(description="Only this HTTP status (499: client left).")
        ] = None,
        errors_only: Annotated[bool, Field(description="Only failed requests.")] = False,
        since: Annotated[
            str | None, Field(description="A window back from now ('1h', '7d') or ISO time.")
        ] = None,
        limit: Annotated[int, Field(ge=1, le=1000, description="Rows at most.")] = 50,
    ) -> dict[str, Any]:
        """Recent generation requests, newest first: time, model, profile, API key, endpoint,
        status, error, prompt/completion/cached tokens, time to first token and duration."""
        rows = await service.requests_log(
            model=model,
            key=key,
            status=status,
            errors_only=errors_only,
            since=since,
            limit=limit,
        )
        return {"requests": rows}

    @tool
    async def usage_stats(
        since: Annotated[
            str, Field(description="Window back from now ('1h', '24h', '7d') or ISO time.")
        ] = "24h",
        by: Annotated[
            str,
            Field(
                description="Group per model, per API key, both, or only the total.",
                json_schema_extra={"enum": list(USAGE_GROUPS)},  # the service checks it
            ),
        ] = "model",
    ) -> dict[str, Any]:
        """Usage over a window from the request log: requests, errors, cancelled, prompt,
        completion and cached tokens, average and worst time to first token, average
        duration and decode tokens per second; per model, per API key, or both."""
        return await service.usage_stats(since, by)

    @tool
    async def worker_logs(
        model: ModelName,
        lines: Annotated[int, Field(ge=1, le=10000, description="Lines from the end.")] = 100,
    ) -> dict[str, Any]:
        """The end of a model's worker log: load messages, errors, and the traceback of a
        worker that crashed (also for a model no longer loaded)."""
        return await service.worker_logs(model, lines)

    @tool
    async def system_info() -> dict[str, Any]:
        """OS, CPU, memory, MLX version and backend, and the memory budget and its use."""
        return await service.system_info()

    # Resources --------------------------------------------------------------------------------

    @mcp.resource("mlx-manager://models", mime_type="application/json")
    async def models_resource() -> str:
        """Local models."""
        return json.dumps(await service.list_models())

    @mcp.resource("mlx-manager://profiles", mime_type="application/json")
    async def profiles_resource() -> str:
        """Profiles."""
        return json.dumps(await service.list_profiles())

    @mcp.resource("mlx-manager://loaded", mime_type="application/json")
    async def loaded_resource() -> str:
        """Loaded models and their state."""
        return json.dumps(await service.list_loaded())

    return mcp
