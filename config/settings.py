"""One typed Settings object: defaults, then MLX_MANAGER_HOME/config.toml, then MLX_MANAGER_*
environment variables, then command-line flags (each layer overrides the one before)."""

from __future__ import annotations

import math
import os
import re
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
    # Seconds a worker may go without a heartbeat (sent every second, even through a long
    # prefill) before it counts as hung: it is killed and its requests get 503. 0: never.
    worker_stall_timeout: float = 30.0
    # Decode batch size of each worker's BatchGenerator (continuous batching width).
    batch_size: int = 32
    log_level: str = "info"
    # Lifecycle (gateway/engine/pool.py).
    max_loaded_models: int | None = None  # None: no count limit
    memory_budget: str = "75%"  # bytes, a size ("12GB") or a percent of system memory
    idle_ttl: float = 1800.0  # seconds a model stays loaded after its last request; 0: forever
    preload: list[str] = field(default_factory=list)  # loaded at startup and pinned
    max_queue: int = 256  # requests waiting per model before 429
    allowed_models: list[str] = field(default_factory=list)  # glob patterns; empty: all
    # Serve a `model` given as an absolute path outside the model folders and the HF cache.
    allow_any_path: bool = False
    hf_organization: str = ""  # default author filter of model search; empty: all
    warm_spare: bool = True  # keep one worker process with MLX imported, for fast cold loads
    # Access (gateway/service/keys.py). A key here works like one made by `mlx-manager keys create`.
    api_key: str = field(default="", repr=False)
    insecure_no_auth: bool = False  # allow a non-loopback bind with no API key
    # Web pages (gateway/http/origins.py). Beyond the bound address's own names: more Host names
    # ("name", "name:port", "name:*"; "*": any) and origins of other web apps that may call
    # this server ("scheme://host[:port]", "scheme://host:*"; "*": any page at all).
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    # Request limits (gateway/service/limits.py): each violation is a 4xx naming the limit.
    max_body_bytes: str = "16MiB"
    max_tokens_limit: int = 32768  # the largest max_tokens a request may ask for
    max_messages: int = 2048
    max_prompt_chars: int = 2_000_000  # per prompt, all messages together
    max_embedding_inputs: int = 2048  # inputs in one embeddings request (OpenAI's limit)
    max_concurrent_per_key: int = 16  # requests in flight per API key; 0: no limit
    # Slow clients (gateway/http/connections.py): seconds a request's headers, then its body, may
    # take to arrive (0: no limit), and connections open at once (0: no limit).
    request_read_timeout: float = 30.0
    max_connections: int = 512
    # Seconds between `ping` events of an Anthropic stream (/v1/messages) while it waits for a
    # model to load or a long prompt to be read, so that clients do not give up; 0: none.
    stream_ping_interval: float = 10.0
    # KV caches kept per loaded model for reuse by later prompts with the same beginning.
    prompt_cache_bytes: str = "512MiB"  # 0: no prompt cache
    # Observability (gateway/observe/requestlog.py, gateway/observe/logs.py).
    log_retention: str = "30d,1000000"  # request log rows kept: an age, a row count, or both
    # Stored /v1/responses (store: true) kept, as log_retention: each row holds a whole
    # conversation, so fewer rows than the request log's.
    response_retention: str = "30d,10000"
    log_content: bool = False  # also store prompts and completions in the request log
    log_format: str = "text"  # server log lines: "text" (key=value fields) or "json"

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

    def memory_budget_bytes(self, total_memory: int) -> int:
        return parse_size(self.memory_budget, total_memory)

    @property
    def prompt_cache_limit_bytes(self) -> int:
        if self.prompt_cache_bytes == "0":  # _coerce stores 0 (off) as "0"
            return 0
        return parse_size(self.prompt_cache_bytes, 0)

    @property
    def body_limit_bytes(self) -> int:
        return parse_size(self.max_body_bytes, 0)

    @property
    def request_log_limits(self) -> tuple[float | None, int | None]:
        """(max age in seconds, max rows) of the request log; (0, 0) when it is off."""
        return parse_retention(self.log_retention)

    @property
    def response_limits(self) -> tuple[float | None, int | None]:
        """(max age in seconds, max rows) of stored responses; (0, 0): none are kept."""
        return parse_retention(self.response_retention, "response retention")

    def token_file(self) -> Path:
        """Where a running server leaves a key for local clients (the CLI, `mlx-manager mcp`):
        whoever can read this folder can already edit the key table itself."""
        return self.home / f"server-{self.port}.token"


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(text: str, total: int) -> int:
    """Bytes from "12884901888", "12GB", "12 GiB" or "75%" (of `total`)."""
    value = str(text).strip().lower().replace(" ", "")
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return int(total * percent / 100)
        number = value.rstrip("kmgtib")
        unit = value[len(number) :]
        if unit not in _UNITS or float(number) <= 0:
            raise ValueError
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise SettingsError(
            f"memory size {text!r}: use bytes, a size like '12GB' or a percent like '75%'"
        ) from None


def parse_duration(value: float | int | str | None) -> float | None:
    """Seconds from 300, "300", "300s", "5m", "1h" (Ollama's keep_alive forms)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        suffix = next((s for s in scale if text.endswith(s)), "")
        seconds = float(text[: len(text) - len(suffix)]) * scale.get(suffix, 1)
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {value!r}")
    return seconds


def parse_retention(text: str, what: str = "log retention") -> tuple[float | None, int | None]:
    """ "30d", "100000", "30d,100000" (an age needs its unit; a bare number counts rows), or
    "0" (keep nothing). Returns (max age in seconds, max rows)."""
    if str(text).strip() == "0":
        return 0.0, 0
    age: float | None = None
    rows: int | None = None
    for part in str(text).lower().replace(" ", "").split(","):
        if not part:
            continue
        if part.isdigit():
            rows = int(part)
        else:
            try:
                age = parse_duration(part)
            except ValueError:
                age = None
            if age is None or age <= 0 or part[-1].isdigit():
                raise SettingsError(
                    f"{what} {text!r}: use an age like '30d', a row count like '100000', "
                    "both ('30d,100000'), or 0 to keep none"
                )
    if rows == 0 or (age is None and rows is None):
        raise SettingsError(f"{what} {text!r}: give an age, a row count, or 0")
    return age, rows


# A Host name (or [IPv6 address]) with an optional port or ":*"; an origin is a scheme and one.
HOST_ENTRY = re.compile(r"([a-z0-9_.-]+|\[[0-9a-f:.]+\])(:([0-9]+|\*))?")
ORIGIN_ENTRY = re.compile(r"[a-z][a-z0-9+.-]*://" + HOST_ENTRY.pattern)


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML/env/flag value into the type the Settings field holds."""
    if value is None:
        return None
    if name in ("home", "hf_cache"):
        return Path(str(value)).expanduser()
    if name == "model_dirs":
        items = value.split(os.pathsep) if isinstance(value, str) else list(value)
        return [Path(str(p)).expanduser() for p in items if str(p)]
    if name in ("preload", "allowed_models"):
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(p).strip() for p in items if str(p).strip()]
    if name in ("allowed_hosts", "allowed_origins"):
        items = value.split(",") if isinstance(value, str) else list(value)
        entries = [str(p).strip().lower().rstrip("/") for p in items if str(p).strip()]
        pattern = HOST_ENTRY if name == "allowed_hosts" else ORIGIN_ENTRY
        if not all(e == "*" or pattern.fullmatch(e) for e in entries):
            raise ValueError
        return entries
    if name in ("port", "max_concurrent_per_key", "max_connections"):
        number = int(value)
        if number < 0:
            raise ValueError
        return number
    if name in (
        "batch_size",
        "max_queue",
        "max_tokens_limit",
        "max_messages",
        "max_prompt_chars",
        "max_embedding_inputs",
    ):
        number = int(value)
        if number < 1:
            raise ValueError
        return number
    if name in (
        "load_timeout",
        "idle_ttl",
        "worker_stall_timeout",
        "request_read_timeout",
        "stream_ping_interval",
    ):
        seconds = parse_duration(value)
        if seconds is None or seconds < 0:
            raise ValueError
        return seconds
    if name in ("default_max_tokens", "max_loaded_models"):
        if str(value).strip().lower() in ("", "none", "0"):
            return None
        number = int(value)
        if number < 1:
            raise ValueError
        return number
    if name in ("log_retention", "response_retention"):
        parse_retention(str(value), name.replace("_", " "))  # a typo stops startup
        return str(value)
    if name == "log_format":
        if str(value).strip().lower() not in ("text", "json"):
            raise ValueError
        return str(value).strip().lower()
    if name in ("warm_spare", "insecure_no_auth", "log_content", "allow_any_path"):
        if isinstance(value, bool):
            return value
        flag = str(value).strip().lower()
        if flag not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError
        return flag in ("1", "true", "yes", "on")
    if name == "prompt_cache_bytes" and str(value).strip() == "0":
        return "0"
    if name in ("memory_budget", "max_body_bytes", "prompt_cache_bytes"):
        if name != "memory_budget" and str(value).strip().endswith("%"):
            raise ValueError
        parse_size(str(value), 1)  # validate now: a typo should stop startup, not a request
        return str(value)
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
            except SettingsError:
                raise
            except (TypeError, ValueError):
                raise SettingsError(f"setting {name!r}: invalid value {raw!r}") from None
    values["home"] = home
    return Settings(**values)
