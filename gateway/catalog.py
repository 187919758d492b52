"""What a request's `model` can name: a profile name or alias, then a local model id, then an
absolute path to a model folder."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import Settings
from config.store import Store
from gateway.errors import ModelNotFound
from gateway.hub import LocalModel, read_local_model, scan_local_models


@dataclass(frozen=True)
class Resolved:
    model: LocalModel
    profile: dict[str, Any] | None

    @property
    def key(self) -> str:
        """What the pool keys workers by: one worker per model folder, shared by its profiles."""
        return str(self.model.path)


class Catalog:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._models: dict[str, LocalModel] = {}
        self.refresh()

    def refresh(self) -> list[LocalModel]:
        models = scan_local_models(self.settings.hf_cache, self.settings.all_model_dirs())
        self._models = {m.id: m for m in models}
        return models

    def models(self) -> list[LocalModel]:
        """A fresh scan: models added or removed on disk show up at once."""
        return self.refresh()

    def get(self, model_id: str) -> LocalModel | None:
        model = self._models.get(model_id)
        if model is None or not (model.path / "config.json").is_file():
            model = {m.id: m for m in self.refresh()}.get(model_id)
        return model

    def resolve(self, name: str) -> Resolved:
        profile = self._profile(name)
        if profile is not None:
            model = self.get(profile["model"])
            if model is None:
                raise ModelNotFound(
                    f"Profile '{profile['name']}' uses model '{profile['model']}', "
                    "which is not available locally.",
                    param="model",
                )
            return Resolved(model, profile)
        model = self.get(name)
        if model is None and Path(name).is_absolute():
            model = read_local_model(Path(name))
        if model is None:
            raise ModelNotFound(self._not_found_message(name), param="model")
        return Resolved(model, None)

    def _profile(self, name: str) -> dict[str, Any] | None:
        profile = self.store.profile(name)
        if profile is not None:
            return profile
        for p in self.store.profiles():
            if name in p["aliases"]:
                return p
        return None

    def names(self) -> list[str]:
        names = list(self._models)
        for p in self.store.profiles():
            names += [p["name"], *p["aliases"]]
        return names

    def _not_found_message(self, name: str) -> str:
        names = self.names()
        lowered = {n.lower(): n for n in names}
        close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
        close += [n.lower() for n in names if name.lower() in n.lower() and n.lower() not in close]
        suggestions = [lowered[c] for c in close][:5]
        msg = f"The model '{name}' does not exist or is not available locally."
        if suggestions:
            msg += " Did you mean: " + ", ".join(f"'{s}'" for s in suggestions) + "?"
        elif names:
            msg += f" GET /v1/models lists the {len(self._models)} local models."
        else:
            msg += " No local models were found; see MLX_MANAGER_MODEL_DIRS."
        return msg
