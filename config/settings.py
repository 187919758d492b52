"""One typed Settings object: defaults, then MLX_MANAGER_HOME/config.toml, then MLX_MANAGER_*
environment variables, then command-line flags (each layer overrides the one before)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "MLX_MANAGER_"


def default_home() -> Path:
    return Path(os.environ.get(ENV_PREFIX + "HOME") or Path.home() / ".mlx-manager").expanduser()


def default_hf_cache() -> Path:
    # The same precedence huggingface_hub uses, without importing it (it reads env at import).
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


@dataclass
class Settings:
    home: Path = field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = 8080
    model_dirs: list[Path] = field(default_factory=list)
    hf_cache: Path = field(default_factory=default_hf_cache)
    # Default max_tokens when a request names none: None means "the rest of the context".
    default_max_tokens: int | None = None
    # Seconds a worker may take to load a model before the load counts as failed.
    load_timeout: float = 600.0
    # Decode batch size of each worker's BatchGenerator (continuous batching width).
    batch_size: int = 32
    log_level: str = "info"

    @property
    def db_path(self) -> Path:
        return self.home / "mlx-manager.db"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def own_models_dir(self) -> Path:
        """Models mlx-manager builds itself (the offline demo model) live here."""
        return self.home / "models"

    def all_model_dirs(self) -> list[Path]:
        return [*self.model_dirs, self.own_models_dir]


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML/env/flag value into the type the Settings field holds."""
    if value is None:
        return None
    if name in ("home", "hf_cache"):
        return Path(str(value)).expanduser()
    if name == "model_dirs":
        items = value.split(os.pathsep) if isinstance(value, str) else list(value)
        return [Path(str(p)).expanduser() for p in items if str(p)]
    if name == "port" or name == "batch_size":
        return int(value)
    if name == "load_timeout":
        return float(value)
    if name == "default_max_tokens":
        return int(value) if str(value).strip() not in ("", "none", "None") else None
    return str(value)


class SettingsError(ValueError):
    pass


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(Settings)}
    layers: list[dict[str, Any]] = []

    home = Path(
        (flags or {}).get("home") or environ.get(ENV_PREFIX + "HOME") or default_home()
    ).expanduser()
    toml_path = home / "config.toml"
    if toml_path.exists():
        try:
            data = tomllib.loads(toml_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"{toml_path}: {e}") from None
        unknown = set(data) - names
        if unknown:
            raise SettingsError(f"{toml_path}: unknown setting(s) {sorted(unknown)}")
        layers.append(data)
    layers.append(
        {
            name: environ[ENV_PREFIX + name.upper()]
            for name in names
            if environ.get(ENV_PREFIX + name.upper()) not in (None, "")
        }
    )
    layers.append({k: v for k, v in (flags or {}).items() if v is not None and k in names})

    values: dict[str, Any] = {"home": home}
    for layer in layers:
        for name, raw in layer.items():
            try:
                values[name] = _coerce(name, raw)
            except (TypeError, ValueError):
                raise SettingsError(f"setting {name!r}: invalid value {raw!r}") from None
    values["home"] = home
    return Settings(**values)
