"""API keys: made by `mlx-manager keys create`, stored only as hashes, checked on every request
once any key exists.

Keys are 256 random bits, so a plain SHA-256 is enough to store them (a slow password hash
protects guessable secrets; these cannot be guessed). A presented key is hashed and compared
with every known hash using `hmac.compare_digest`, without stopping at a match, so the time a
check takes says nothing about which key, or how much of one, was right.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
import time
from typing import Any

from config.settings import Settings
from config.store import Store
from gateway.errors import Conflict, InvalidRequest, NotFound

KEY_PREFIX = "mlxm-"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOUCH_EVERY = 60.0  # seconds between `last_used` writes for one key
ENV_KEY_NAME = "env"  # the key given as MLX_MANAGER_API_KEY
LOCAL_KEY_NAME = "local"  # the running server's token file, for local clients


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # Keys that live outside the table: the environment's, and the server's local token.
        self._fixed: list[tuple[bytes, str]] = []
        if settings.api_key:
            self._fixed.append((digest(settings.api_key), ENV_KEY_NAME))
        self._stored: list[tuple[bytes, str]] = []
        self._version: tuple[int, ...] | None = None
        self._touched: dict[str, float] = {}

    # Management (the CLI) -------------------------------------------------------------------

    def create(self, name: str) -> dict[str, Any]:
        """A new key. The returned `key` is shown once: only its hash is kept."""
        if not NAME.match(name or ""):
            raise InvalidRequest(
                f"Invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'.",
                param="name",
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.store.write():
            if any(r["name"] == name for r in self.store.api_keys()):
                raise Conflict(f"A key named '{name}' exists already.", param="name")
            row = self.store.add_api_key(name, digest(key).hex(), key[: len(KEY_PREFIX) + 4])
        self._version = None
        return {**_public(row), "key": key}

    def list(self) -> list[dict[str, Any]]:
        return [_public(r) for r in self.store.api_keys()]

    def revoke(self, name: str) -> dict[str, Any]:
        with self.store.write():
            rows = {r["name"]: r for r in self.store.api_keys()}
            if name not in rows:
                known = f" Keys: {', '.join(rows)}." if rows else " There are no keys."
                raise NotFound(f"No key named '{name}'.{known}", param="name")
            self.store.delete_api_key(name)
        self._version = None
        return {**_public(rows[name]), "revoked": True}

    # Checking (every request) ---------------------------------------------------------------

    def add_local_token(self, token: str) -> None:
        self._fixed.append((digest(token), LOCAL_KEY_NAME))

    def required(self) -> bool:
        """Keys are required once any exists (in the table or the environment)."""
        return any(n != LOCAL_KEY_NAME for _, n in self._fixed) or bool(self._table())

    def check(self, key: str) -> str | None:
        """The name of the key `key` is, or None. Constant time in the key's content."""
        presented = digest(key)
        found = None
        for known, name in [*self._fixed, *self._table()]:
            if hmac.compare_digest(presented, known):
                found = name
        return found

    def touch(self, name: str) -> bool:
        """Record use of a stored key, at most once a minute. True when a write is due."""
        if name in (ENV_KEY_NAME, LOCAL_KEY_NAME):
            return False
        now = time.monotonic()
        if now - self._touched.get(name, -TOUCH_EVERY) < TOUCH_EVERY:
            return False
        self._touched[name] = now
        return True

    def _table(self) -> builtins.list[tuple[bytes, str]]:
        # Re-read only when the database changed (a `keys create` in another process): no
        # query on the request's path.
        version = self.store.version()
        if version != self._version:
            self._stored = [(bytes.fromhex(r["hash"]), r["name"]) for r in self.store.api_keys()]
            self._version = version
        return self._stored


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"],
        "prefix": row["prefix"] + "…",
        "created": row["created"],
        "last_used": row.get("last_used"),
    }


def write_token_file(settings: Settings) -> str:
    """A fresh key for this server run, readable only by its owner."""
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    path = settings.token_file()
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def client_key(settings: Settings) -> str | None:
    """The key a local client sends: MLX_MANAGER_API_KEY, else the running server's token."""
    if settings.api_key:
        return settings.api_key
    try:
        return settings.token_file().read_text().strip() or None
    except OSError:
        return None


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_bind(settings: Settings, keys: ApiKeys) -> None:
    """Refuse to listen beyond this machine with no key: anyone who can reach the port could
    use the models, download into the cache and delete from it."""
    if is_loopback(settings.host) or settings.insecure_no_auth or keys.required():
        return
    raise InvalidRequest(
        f"Refusing to listen on {settings.host} without an API key: anyone on the network could "
        "use, download and delete models.\n"
        "  Create a key:   mlx-manager keys create --name NAME\n"
        "  or set one:     MLX_MANAGER_API_KEY=...\n"
        "  or, knowingly:  mlx-manager serve --insecure-no-auth",
        param="host",
    )
