"""Profiles: a name (usable as `model` in /v1 requests) bound to a model and its defaults.

Validation lives here, once, for every adapter: errors name the field, duplicate names and
aliases are refused, a name or alias cannot be a local model's id, and a profile must name a
model that exists locally and that the allow-list lets through.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.catalog.names import Catalog
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.fields import (
    MAX_ALIASES,
    MAX_NAME_CHARS,
    Description,
    ModelRef,
    Seconds,
    SystemPrompt,
    Temperature,
    Tokens,
    TopP,
)

log = logging.getLogger("mlx_manager")

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"^\S(.*\S)?$")]


class Profile(BaseModel):
    """A profile's fields, their bounds and descriptions: the one schema that the HTTP admin
    API, the MCP tools (their parameters are these fields), the CLI (its options are these
    fields) and the store's profiles table (a column per field) follow."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="The profile's unique name, usable as `model` in /v1.")
    model: ModelRef = Field(description="Local model id (org/name) or absolute path.")
    aliases: Annotated[list[Name], Field(max_length=MAX_ALIASES)] = Field(
        default_factory=list, description="Other names for it (unique)."
    )
    temperature: Temperature | None = Field(None, description="Default temperature, 0-2.")
    top_p: TopP | None = Field(None, description="Default top_p, (0, 1].")
    max_tokens: Tokens | None = Field(None, description="Default max_tokens.")
    context_length: Tokens | None = Field(None, description="Context cap in tokens.")
    system_prompt: SystemPrompt | None = Field(None, description="Added when a chat has none.")
    ttl: Seconds | None = Field(None, description="Idle seconds before unloading; 0: never.")
    pinned: bool = Field(False, description="Load now and at startup; never evict.")
    description: Description | None = Field(None, description="Free text.")
    reasoning_format: Literal["separate", "inline"] | None = Field(
        None, description="'separate' (reasoning_content) or 'inline'."
    )
    tool_parser: str | None = Field(
        None, description="mlx-lm tool parser ('json_tools', ...); default: inferred."
    )
    thinking: bool | None = Field(
        None, description="Reasoning models: think (true) or not (false); default: the model's."
    )
    reasoning_budget: Tokens | None = Field(
        None, description="Most reasoning tokens; then the think block is closed."
    )
    pooling: Literal["last", "mean", "cls"] | None = Field(
        None, description="Embeddings: pool the mean, [CLS] or the last token; default: inferred."
    )
    rerank: Literal["yes_no"] | None = Field(
        None, description="Rerank as Qwen3-Reranker does: the probability of 'yes'."
    )

    @field_validator("aliases")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        repeated = sorted({a for a in v if v.count(a) > 1})
        if repeated:
            raise ValueError(f"each alias once; repeated: {', '.join(map(repr, repeated))}")
        return v

    @field_validator("tool_parser")
    @classmethod
    def _known_parser(cls, v: str | None) -> str | None:
        known = tool_parsers()
        if v is not None and v not in known:
            raise ValueError(f"unknown tool parser; mlx-lm has: {', '.join(known)}")
        return v


# Every field but the name, in the model's order: what can be set, changed and cleared.
FIELDS = tuple(f for f in Profile.model_fields if f != "name")


@cache
def tool_parsers() -> list[str]:
    """mlx-lm's tool parser modules, listed without importing mlx-lm (which imports MLX)."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "tool_parsers"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def validate(data: dict[str, Any]) -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "profile"
        if err["type"] == "extra_forbidden":
            return _raise(
                f"Unknown profile field '{field}'. Fields: name, {', '.join(FIELDS)}.", field
            )
        if err["type"] == "missing":
            return _raise(f"Missing required profile field '{field}'.", field)
        return _raise(f"Invalid value for '{field}': {err['msg']}.", field)


def _raise(message: str, field: str) -> Profile:
    raise InvalidRequest(message, param=field)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored profile as the API shows it. A row that breaks the rules (written by hand, or
    before a bound existed: ttl=Infinity) is still shown, with its bad fields emptied and an
    `error` saying what to fix: one bad row must not make every listing fail."""
    public = {k: row.get(k) for k in ("name", *FIELDS, "created", "updated")}
    problems = dict(row.get("unreadable") or {})
    try:
        Profile.model_validate({k: public[k] for k in ("name", *FIELDS)})
    except ValidationError as e:
        for err in e.errors():
            problems.setdefault(str(err["loc"][0]), err["msg"])
    if not problems:
        return public
    for field in problems.keys() - {"name", "model"}:  # strings: shown as they are
        public[field] = Profile.model_fields[field].get_default(call_default_factory=True)
    public["error"] = (
        "This stored profile is invalid: "
        + "; ".join(f"{k}: {v}" for k, v in problems.items())
        + ". Update these fields or delete the profile."
    )
    log.warning("profile %r: %s", row.get("name"), public["error"])
    return public


class Profiles:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.store = catalog.store

    def list(self) -> list[dict[str, Any]]:
        return [_public(p) for p in self.store.profiles()]

    def get(self, name: str) -> dict[str, Any]:
        row = self.store.profile(name)
        if row is None:
            names = [p["name"] for p in self.store.profiles()]
            known = f" Profiles: {', '.join(names)}." if names else " There are no profiles yet."
            raise NotFound(f"Profile '{name}' does not exist.{known}", param="name")
        return _public(row)

    # Each write checks and saves in one transaction: two writers cannot both take a name.

    def create(self, data: dict[str, Any]) -> dict[str, Any]:
        profile = validate(data)
        with self.store.write():
            if self.store.profile(profile.name) is not None:
                raise Conflict(
                    f"A profile named '{profile.name}' already exists; use "
                    "update_profile to change it.",
                    param="name",
                )
            self._check(profile)
            self.store.save_profile(profile.model_dump())
            return self.get(profile.name)

    def update(
        self, name: str, changes: dict[str, Any], clear: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Change the fields in `changes`; reset those in `clear` to their defaults."""
        with self.store.write():
            return self._update(name, changes, clear)

    def _update(self, name: str, changes: dict[str, Any], clear: Sequence[str]) -> dict[str, Any]:
        current = self.get(name)
        for field in clear:
            if field not in FIELDS or field == "model":
                raise InvalidRequest(
                    f"Cannot clear '{field}'. Fields that can be cleared: "
                    f"{', '.join(f for f in FIELDS if f != 'model')}.",
                    param="clear",
                )
            changes = {
                **changes,
                field: Profile.model_fields[field].get_default(call_default_factory=True),
            }
        if "name" in changes and changes["name"] != name:
            raise InvalidRequest(
                "A profile cannot be renamed; create a new one instead.", param="name"
            )
        merged = {k: current[k] for k in FIELDS}  # not `error`, `created`, `updated`
        profile = validate({**merged, **changes, "name": name})
        self._check(profile)
        self.store.save_profile(profile.model_dump())
        return self.get(name)

    def delete(self, name: str) -> dict[str, Any]:
        with self.store.write():
            profile = self.get(name)
            self.store.delete_profile(name)
            return profile

    def _check(self, profile: Profile) -> None:
        """Names and aliases are unique across profiles and take no local model's id; the
        model exists locally and the allow-list lets it be used (403 otherwise)."""
        ids = {m.id for m in self.catalog.refresh()}
        for field, names in (("name", [profile.name]), ("aliases", profile.aliases)):
            for n in names:
                if n in ids:
                    raise InvalidRequest(
                        f"'{n}' is the id of a local model: a profile or alias cannot take "
                        "a model's own name (it would keep meaning that model). Choose another "
                        f"{field}.",
                        param=field,
                    )
        taken: dict[str, str] = {}
        for other in self.store.profiles():
            if other["name"] != profile.name:
                for n in (other["name"], *other["aliases"]):
                    taken[n] = other["name"]
        for alias in profile.aliases:
            if alias == profile.name or alias in taken:
                owner = taken.get(alias, profile.name)
                raise Conflict(
                    f"The alias '{alias}' is already used by profile '{owner}'.", param="aliases"
                )
        if profile.name in taken:
            raise Conflict(
                f"'{profile.name}' is already an alias of profile '{taken[profile.name]}'.",
                param="name",
            )
        is_profile = self.store.profile(profile.model) is not None or profile.model in taken
        if is_profile and profile.model not in ids:  # a model's id means the model
            raise InvalidRequest(
                f"'{profile.model}' is a profile; a profile must name a model.", param="model"
            )
        try:
            self.catalog.model(profile.model)  # PermissionDenied (403) passes through
        except NotFound as e:
            raise InvalidRequest(
                f"Cannot use model '{profile.model}': {e.message}", param="model"
            ) from None
