"""The ``/lafn/banks`` admin routes, closed by default (threat model: docs/serving.md).

- A token always: ``Authorization: Bearer <token>``, compared in constant time (``hmac.compare_digest``); when the
  server is given none, one is generated at start (``lafn serve`` prints it and writes it to a 0600 file).
- The ``Host`` header must name an address the server serves (a page that rebinds its own DNS name to 127.0.0.1
  sends its own name: refused), and a request with an ``Origin`` header (sent by browsers) is refused: no CORS.
- A bank that fails to load answers 400 with the bank's name, the path and the field, never a value read from
  disk (a ``lafn_config.json`` that links to another JSON file must not read it out to the caller): quoted values
  and what follows ``got`` are left out of the answer (the server's log has the whole message).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, HTTPException, Request

from .banks import check_bank_name
from .manager import EditableModelManager

logger = logging.getLogger(__name__)

__all__ = ["AdminSettings", "add_admin_routes", "redact", "served_hosts"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_GOT = re.compile(r"\bgot\b.*$", re.DOTALL)
HIDDEN = "<not shown>"


def served_hosts(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The names a ``Host`` header may give for a server listening on ``host``: the loopback names on loopback,
    this machine's names on a wildcard address (where any IP literal is accepted too, see ``host_allowed``),
    else ``host`` itself; with ``extra`` (``--allowed-host``)."""
    if host in LOOPBACK_HOSTS:
        names = set(LOOPBACK_HOSTS)
    elif host in WILDCARD_HOSTS:
        names = {*LOOPBACK_HOSTS, socket.gethostname(), socket.getfqdn()}
    else:
        names = {host}
    return frozenset(name.lower().strip("[]") for name in (*names, *extra) if name)


@dataclass(frozen=True)
class AdminSettings:
    """Who may call the admin routes.

    Args:
        token: The bearer token every admin call must carry.
        hosts: The names (no port) a ``Host`` header may give (see ``served_hosts``).
        any_ip: Whether any IP literal is also a served address (the server listens on every address).
    """

    token: str = field(metadata={"help": "bearer token of every admin call"})
    hosts: frozenset[str] = field(default=served_hosts("127.0.0.1"),
                                  metadata={"help": "names a Host header may give"})
    any_ip: bool = field(default=False, metadata={"help": "any IP literal is a served address too"})

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token or any(c.isspace() for c in self.token) \
                or not self.token.isprintable():
            raise ValueError("the admin token must be a non-empty string of printable characters without spaces")
        if not isinstance(self.hosts, frozenset) or not all(isinstance(h, str) and h for h in self.hosts):
            raise ValueError(f"AdminSettings.hosts must be a frozenset of host names, got {self.hosts!r}")

    @classmethod
    def for_host(cls, host: str, token: str | None = None, extra_hosts: Iterable[str] = ()) -> AdminSettings:
        """Settings for a server on ``host``; a new random token when ``token`` is ``None``."""
        return cls(secrets.token_urlsafe(32) if token is None else token, served_hosts(host, extra_hosts),
                   any_ip=host in WILDCARD_HOSTS)

    def host_allowed(self, header: str) -> bool:
        """Whether a ``Host`` header (``name``, ``name:port``, ``[v6]:port``) names a served address."""
        name = header.strip().lower()
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_ip

    def token_matches(self, header: str) -> bool:
        return hmac.compare_digest(header.encode("utf-8", "replace"), f"Bearer {self.token}".encode())


def redact(message: str, keep: Iterable[str] = ()) -> str:
    """``message`` without the values it quotes (but those in ``keep``) and without what follows ``got``."""
    kept = {text for text in keep if text}

    def hide(match: re.Match[str]) -> str:
        return match.group(0) if match.group(0)[1:-1] in kept else HIDDEN

    return _GOT.sub(f"got {HIDDEN}", _QUOTED.sub(hide, message))


def add_admin_routes(app: Any, manager: EditableModelManager, settings: AdminSettings) -> None:
    """``GET /lafn/banks``; ``POST /lafn/banks`` {"path", "name"?}: load or replace; ``POST /lafn/banks/reload``
    {"name"?}: read again from disk; ``DELETE /lafn/banks/{name}``. They run in the model's process between
    its requests (or beside them, with continuous batching); each forward from then on uses the new banks."""

    def authorize(request: Request) -> None:
        if not settings.host_allowed(request.headers.get("host", "")):
            raise HTTPException(status_code=403, detail="admin calls must name this server in their Host header "
                                f"(one of {sorted(settings.hosts)}, with the port)")
        if "origin" in request.headers:
            raise HTTPException(status_code=403, detail="admin calls from a web page (an Origin header) are refused")
        if not settings.token_matches(request.headers.get("authorization", "")):
            raise HTTPException(status_code=401, detail="admin calls need 'Authorization: Bearer <admin token>'")

    async def run(command: str, *args: Any, name: str = "", path: str = "") -> dict[str, Any]:
        try:
            banks = await manager.bank_command(command, *args)
        except ValueError as error:
            logger.warning("admin %s %s failed: %s", command, name or path, error)
            where = f"bank {name!r}" + (f" at {path}" if path else "")
            raise HTTPException(status_code=400, detail=f"{where}: {redact(str(error), (name, path))}") from None
        return {"base": manager.base_name, "models": manager.served_names(),
                "banks": [{**bank, "model": f"{manager.base_name}+{bank['name']}"} for bank in banks]}

    def fields(body: Any, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HTTPException(status_code=422, detail="the body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise HTTPException(status_code=422, detail=f"unknown field(s) {unknown}; the body takes {sorted(allowed)}")
        return body

    def loaded(name: Any) -> str:
        if not isinstance(name, str):
            raise HTTPException(status_code=422, detail=f"name must be a bank name (a string), got {name!r}")
        if name not in manager.bank_names:
            raise HTTPException(status_code=404, detail=f"no bank named {name!r}; loaded: {sorted(manager.bank_names)}")
        return name

    @app.get("/lafn/banks", dependencies=[Depends(authorize)])
    async def list_banks() -> dict[str, Any]:
        return await run("list")

    @app.post("/lafn/banks", dependencies=[Depends(authorize)])
    async def load_bank(body: dict[str, Any]) -> dict[str, Any]:
        path = fields(body, {"path", "name"}).get("path")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise HTTPException(status_code=422, detail="path must be a non-empty string: the body is "
                                "{\"path\": DIR, \"name\": optional}")
        name = body.get("name") or Path(path.rstrip("/\\")).name
        try:
            check_bank_name(name)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return await run("load", name, path, name=name, path=path)

    @app.post("/lafn/banks/reload", dependencies=[Depends(authorize)])
    async def reload_banks(body: dict[str, Any] | None = None) -> dict[str, Any]:
        name = fields(body or {}, {"name"}).get("name")
        chosen = None if name is None else loaded(name)
        return await run("reload", None if chosen is None else [chosen], name=chosen or "")

    @app.delete("/lafn/banks/{name}", dependencies=[Depends(authorize)])
    async def remove_bank(name: str) -> dict[str, Any]:
        return await run("remove", loaded(name), name=name)
