"""Profiles: a name (usable as `model` in /v1 requests) bound to a model and its defaults.

Validation lives here, once, for every adapter: errors name the field, duplicate names and
aliases are refused, a name or alias cannot be a local model's id, and a profile must name a
model that exists locally and that the allow-list lets through.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.catalog import Catalog
from gateway.errors import Conflict, InvalidRequest, NotFound

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^\S(.*\S)?$")]

FIELDS = (
    "model",
    "aliases",
    "temperature",
    "top_p",
    "max_tokens",
    "context_length",
    "system_prompt",
    "ttl",
    "pinned",
    "description",
    "reasoning_format",
    "tool_parser",
)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    model: Annotated[str, Field(min_length=1)]
    aliases: list[Name] = Field(default_factory=list)
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    context_length: Annotated[int, Field(ge=1)] | None = None
    system_prompt: str | None = None
    ttl: Annotated[float, Field(ge=0)] | None = None  # idle seconds; 0 keeps it loaded
    pinned: bool = False
    description: str | None = None
    reasoning_format: Literal["separate", "inline"] | None = None
    tool_parser: str | None = None  # a module of mlx_lm.tool_parsers

    @field_validator("tool_parser")
    @classmethod
    def _known_parser(cls, v: str | None) -> str | None:
        known = tool_parsers()
        if v is not None and v not in known:
            raise ValueError(f"unknown tool parser; mlx-lm has: {', '.join(known)}")
        return v


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
    return {k: row.get(k) for k in ("name", *FIELDS, "created", "updated")}


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
        merged = {k: v for k, v in current.items() if k not in ("created", "updated")}
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
