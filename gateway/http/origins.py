"""Which Host and Origin headers the server answers: one definition for the HTTP gate on every
route (middleware.py), the CORS answers to allowed web apps, and the MCP transport's own
DNS-rebinding protection.

A web page can reach a local server in two ways that an API key-less server must refuse: a
cross-site request (its Origin is the page's, not ours) and DNS rebinding (the attacker's name
resolves to this machine, so the Host header carries that name). Clients that are not browsers
(SDKs, curl, the mcp client) send no Origin and are unaffected.

Patterns follow the MCP SDK's: an exact value, `name:*` for any port, or `*` for anything.
Hosts: this server's own names on any port (the name, not the port, is what DNS rebinding
forges, and a forwarded port keeps working). Origins: those names with the bound port only,
as a page on another port of this machine is another web app.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

import psutil
from mcp.server.transport_security import TransportSecuritySettings

from config.settings import Settings
from gateway.service.keys import is_loopback

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SCHEMES = ("http", "https")


@dataclass(frozen=True)
class HostPolicy:
    hosts: tuple[str, ...]
    origins: tuple[str, ...]

    @property
    def any_host(self) -> bool:
        return "*" in self.hosts

    @property
    def any_origin(self) -> bool:
        return "*" in self.origins

    def host_allowed(self, host: str) -> bool:
        return _matches(host.lower(), self.hosts)

    def origin_allowed(self, origin: str) -> bool:
        return _matches(origin.lower(), self.origins)

    def origin_regex(self) -> str:
        """The allowed origins as one regular expression, for Starlette's CORSMiddleware."""
        parts = [
            re.escape(p[:-2]) + r":[0-9]+" if p.endswith(":*") else re.escape(p)
            for p in self.origins
            if p != "*"
        ]
        return "|".join(parts) or "(?!)"

    def transport_security(self) -> TransportSecuritySettings:
        """The same lists for the MCP transport. Its matching has no `*` for everything: when
        one is set, its own check is off and the gate in front of every route (/mcp too)
        enforces the rest."""
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=not (self.any_host or self.any_origin),
            allowed_hosts=list(self.hosts),
            allowed_origins=list(self.origins),
        )


def _matches(value: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p == "*" or value == p:
            return True
        if p.endswith(":*") and value.startswith(p[:-1]) and value[len(p) - 1 :].isdigit():
            return True
    return False


def host_policy(settings: Settings) -> HostPolicy:
    own = _own_names(settings.host)
    hosts = [f"{n}:*" for n in own]
    origins = [f"{s}://{n}:{settings.port}" for n in own for s in SCHEMES]
    for entry in settings.allowed_hosts:
        # A name set without a port: any port, or none (a proxy on 80 or 443).
        given = [entry] if entry == "*" or _has_port(entry) else [entry, f"{entry}:*"]
        hosts += given
        # Pages served under a name of this server are same-origin.
        origins += [f"{s}://{h}" for h in given if h != "*" for s in SCHEMES]
    origins += settings.allowed_origins
    return HostPolicy(tuple(dict.fromkeys(hosts)), tuple(dict.fromkeys(origins)))


def _has_port(host: str) -> bool:
    return bool(re.search(r":([0-9]+|\*)$", host)) and (host[0] != "[" or "]:" in host)


def _own_names(host: str) -> list[str]:
    """This server's names: loopback always; the bound address; when that is every address
    (0.0.0.0, ::) or a LAN one, this machine's names and (for every address) its addresses."""
    names = [*LOOPBACK_NAMES]
    if host not in WILDCARD_BINDS:
        names.append(_bracketed(host))
    if not is_loopback(host):
        names += [socket.gethostname(), socket.getfqdn()]
    if host in WILDCARD_BINDS:
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    names.append(_bracketed(a.address.split("%")[0]))
    return list(dict.fromkeys(n.lower() for n in names if n))


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
