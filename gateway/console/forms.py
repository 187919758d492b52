"""The profile form: its fields, and the posted form turned into the values the service's
profile operations take (their validation is the catalogue's, once; here only text becomes
numbers, booleans and lists)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    kind: str  # text | number | textarea | checkbox | model
    help: str = ""
    step: str = "any"


PROFILE_FIELDS = (
    Field("name", "Name", "text", "Usable as `model` in requests."),
    Field("model", "Model", "model"),
    Field("temperature", "Temperature", "number", "0 to 2."),
    Field("top_p", "Top p", "number", "Above 0, at most 1."),
    Field("max_tokens", "Max tokens", "number", step="1"),
    Field("context_length", "Context length", "number", "Tokens.", step="1"),
    Field("system_prompt", "System prompt", "textarea", "Added when a chat has none."),
    Field("ttl", "TTL (seconds)", "number", "Idle seconds before unloading; 0: never."),
    Field("pinned", "Pinned", "checkbox", "Load now and at startup; never evict."),
    Field("aliases", "Aliases", "text", "Other names, separated by commas."),
    Field("description", "Description", "textarea"),
)
INTEGERS = {"max_tokens", "context_length"}
NUMBERS = {"temperature", "top_p", "ttl"}


def profile_changes(form: FormData) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """(values set, fields emptied, problems by field) from a posted profile form. An empty
    field is left out of a new profile and cleared from an edited one."""
    values: dict[str, Any] = {}
    clear: list[str] = []
    problems: dict[str, str] = {}
    for field in PROFILE_FIELDS:
        raw = form.get(field.name)
        text = raw.strip() if isinstance(raw, str) else ""
        if field.kind == "checkbox":
            values[field.name] = text == "on"
        elif field.name == "aliases":
            values["aliases"] = [a.strip() for a in text.split(",") if a.strip()]
        elif not text:
            if field.name not in ("name", "model"):
                clear.append(field.name)
        elif field.name in INTEGERS or field.name in NUMBERS:
            try:
                number = float(text)
            except ValueError:
                problems[field.name] = f"{field.label} must be a number, not {text!r}."
                continue
            if field.name in INTEGERS:
                if not number.is_integer():
                    problems[field.name] = f"{field.label} must be a whole number."
                    continue
                values[field.name] = int(number)
            else:
                values[field.name] = number
        else:
            values[field.name] = text
    return values, clear, problems
