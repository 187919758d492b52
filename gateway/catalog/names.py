"""What a request's `model` can name, and whether it may: a local model id, then a profile name
or alias, then an absolute path to a model folder; the allow-list then judges the model the
name resolved to, whatever the name was."""

from __future__ import annotations

import difflib
import fnmatch
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import Settings
from config.store import Store
from gateway.catalog.local import LocalModel, read_local_model, scan_local_models
from gateway.errors import ModelNotFound, PermissionDenied

# Longer names are not paths here (Linux's PATH_MAX): refused before the OS is asked.
MAX_PATH = 4096
# The last scan of the disk is reused while the model folders' own mtimes are unchanged (a model
# folder added or removed changes them) and it is younger than this: a change inside a model
# folder shows within seconds, and a request never waits for a scan it does not need.
RESCAN_SECONDS = 5.0


@dataclass(frozen=True)
class Resolved:
    model: LocalModel
    profile: dict[str, Any] | None

    @property
    def key(self) -> str:
        """What the pool keys workers (and so metrics) by: one worker per real model folder,
        however its path is spelled, shared by its profiles."""
        return self.model.key


class Catalog:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._models: dict[str, LocalModel] = {}
        self._by_key: dict[str, LocalModel] = {}  # by real path
        self._scanned: tuple[float, tuple[int | None, ...]] = (0.0, ())  # when, and the stamp
        self.scans = 0
        self.refresh()

    def _stamp(self) -> tuple[int | None, ...]:
        """The model folders' and the HF cache's mtimes: any folder added or removed in one
        changes them."""
        stamp: list[int | None] = []
        for d in (*self.settings.all_model_dirs(), self.settings.hf_cache):
            try:
                stamp.append(os.stat(d).st_mtime_ns)
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def _fresh(self) -> None:
        """Scan again only if the disk may have changed since the last scan."""
        when, stamp = self._scanned
        if time.monotonic() - when > RESCAN_SECONDS or self._stamp() != stamp:
            self.refresh()

    def refresh(self) -> list[LocalModel]:
        """Scan the disk now (after a download or a delete, which know it changed)."""
        self._scanned = (time.monotonic(), self._stamp())
        self.scans += 1
        models = scan_local_models(self.settings.hf_cache, self.settings.all_model_dirs())
        self._models = {m.id: m for m in models}
        by_key: dict[str, LocalModel] = {}
        for m in models:
            by_key.setdefault(m.key, m)  # one folder listed twice (a symlink): the first name
        self._by_key = by_key
        return models

    def models(self) -> list[LocalModel]:
        """The local models: models added or removed on disk show up at once (a folder added to
        a models folder), or within RESCAN_SECONDS (one changed inside)."""
        self._fresh()
        return list(self._models.values())

    def get(self, model_id: str) -> LocalModel | None:
        model = self._models.get(model_id)
        if model is not None and not (model.path / "config.json").is_file():
            self.refresh()  # it was deleted
        elif model is None:
            self._fresh()  # an unknown name: no scan unless the disk may have changed
        return self._models.get(model_id)

    # Names ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> Resolved:
        """Name -> model (and profile), allow-list enforced. A model's own id wins over a
        profile name or alias (as of the last scan: profiles cannot take a model's name, but a
        model can appear on disk later)."""
        shadowed = name in self._models and self.get(name) is not None
        profile = None if shadowed else self._profile(name)
        if profile is None:
            return Resolved(self.model(name), None)
        model = self.find(profile["model"])
        if model is None:
            raise ModelNotFound(
                f"Profile '{profile['name']}' uses model '{profile['model']}', "
                "which is not available locally.",
                param="model",
            )
        if not self.allowed(model.id):
            raise self.forbidden(name, model)
        return Resolved(model, profile)

    def model(self, name: str) -> LocalModel:
        """The model a local id or an absolute path names (not a profile), allow-list enforced.
        A forbidden name is 403 whether or not it exists."""
        model = self.find(name)
        if model is None:
            if not self.allowed(name):
                raise self.forbidden(name)
            raise ModelNotFound(self._not_found_message(name), param="model")
        if not self.allowed(model.id):
            raise self.forbidden(name, model)
        return model

    def find(self, name: str, scan: bool = True) -> LocalModel | None:
        """The model a local id or an absolute path names, or None; `scan`: look on disk again
        when the last scan does not know an id."""
        if os.path.isabs(name):
            return self._by_path(name)
        return self.get(name) if scan else self._models.get(name)

    def _by_path(self, name: str) -> LocalModel | None:
        """A model folder named by absolute path, judged by its real path, so that `..`, `//`
        and symlinks all name one folder and cannot leave the model folders. Never raises: a
        path the OS refuses names nothing, like a missing one."""
        if len(name) > MAX_PATH:
            return None
        try:
            real = os.path.realpath(name, strict=True)
        except (OSError, ValueError):  # missing, too long, a NUL byte, a symlink loop
            return None
        listed = self._by_key.get(real)
        parent = os.path.dirname(real)
        if listed is None and (parent in self._roots() or os.path.basename(parent) == "snapshots"):
            # A folder that exists (its real path resolved) but was not there at the last scan.
            self.refresh()
            listed = self._by_key.get(real)
        if listed is not None:
            return listed  # a listed model's folder is that model: its id, its worker
        if not (self.settings.allow_any_path or self._inside_roots(real)):
            return None  # the same answer as a missing folder: no probing the disk
        return read_local_model(Path(real))

    def _roots(self) -> list[str]:
        """Where absolute paths may lead: the model folders and the HF cache, real paths."""
        dirs = [*self.settings.all_model_dirs(), self.settings.hf_cache]
        return [os.path.realpath(d) for d in dirs]

    def _inside_roots(self, real: str) -> bool:
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self._roots())

    def _profile(self, name: str) -> dict[str, Any] | None:
        profile = self.store.profile(name)
        if profile is not None:
            return profile
        for p in self.store.profiles():
            if name in p["aliases"]:
                return p
        return None

    def profile_names(self) -> Iterator[tuple[str, dict[str, Any], LocalModel | None]]:
        """(name, profile, its model or None if not on disk) for every profile name and alias a
        request can use: not one a model id takes, not one whose model is forbidden."""
        for p in self.store.profiles():
            model = self.find(p["model"], scan=False)
            if not self.allowed(model.id if model else p["model"]):
                continue
            for name in (p["name"], *p["aliases"]):
                if name not in self._models:
                    yield name, p, model

    def names(self) -> list[str]:
        """Every name a request may use, each once (for suggestions)."""
        ids = [m for m in self._models if self.allowed(m)]
        return ids + [name for name, _, _ in self.profile_names()]

    # The allow-list ---------------------------------------------------------------------------

    def allowed(self, model_id: str) -> bool:
        """Whether MLX_MANAGER_ALLOWED_MODELS lets a model (by id) be used."""
        patterns = self.settings.allowed_models
        return not patterns or any(fnmatch.fnmatchcase(model_id, p) for p in patterns)

    def forbidden(self, name: str, model: LocalModel | None = None) -> PermissionDenied:
        which = f" (model '{model.id}')" if model is not None and model.id != name else ""
        return PermissionDenied(
            f"The model '{name}'{which} is not allowed on this server "
            "(MLX_MANAGER_ALLOWED_MODELS).",
            param="model",
        )

    def _not_found_message(self, name: str) -> str:
        names = self.names()  # only names the allow-list lets through: suggestions leak none
        lowered = {n.lower(): n for n in names}
        close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
        close += [n.lower() for n in names if name.lower() in n.lower() and n.lower() not in close]
        suggestions = [lowered[c] for c in close][:5]
        msg = f"The model '{name}' does not exist or is not available locally."
        if suggestions:
            msg += " Did you mean: " + ", ".join(f"'{s}'" for s in suggestions) + "?"
        elif names:
            msg += " GET /v1/models lists the names you can use."
        else:
            msg += " No local models were found; see MLX_MANAGER_MODEL_DIRS."
        return msg
