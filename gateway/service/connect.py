"""Which service a client gets: beside a running server, one whose backend is that server;
with none, one with a pool of its own."""

from __future__ import annotations

import httpx

from config.settings import Settings
from gateway import errors
from gateway.service.remote import RemoteBackend
from gateway.service.service import Service


async def connect(settings: Settings, server_only: bool = False) -> Service:
    """The service for a client beside (or instead of) a server: the running server's workers
    when one answers on the configured address, else a pool of its own (or, `server_only`,
    an error saying to start a server: a pool that ends with the command is no use)."""
    url = await running_server(settings)
    if url is None and server_only:
        raise errors.ModelUnavailable(
            "No mlx-manager server is running here; start one with `mlx-manager serve`."
        )
    return Service(settings, RemoteBackend(settings, url) if url else None)


async def running_server(settings: Settings) -> str | None:
    """The base URL of an mlx-manager server on the configured host and port, if one runs."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}"
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            r = await client.get(url + "/health")
        if r.status_code == 200 and r.json().get("service") == "mlx-manager":
            return url
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return None
