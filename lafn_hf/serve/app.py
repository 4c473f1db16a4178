"""Build the OpenAI-compatible app: transformers' own server and handlers around an edited model's process.

``build_server`` and the handlers come from ``transformers.cli.serving`` (5.25+) unchanged (request validation,
chat templates, SSE streaming, tool-call parsing, prompt length checks); lafn adds the model manager of
``manager.py`` (the model and its banks live in a process of their own, ``engine.py``) and admin routes under
``/lafn`` to list, load, reload and drop banks while the server runs.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from .banks import check_bank_name
from .engine import LafnLoader, load_editable, resolve_model
from .handlers import CheckedChatHandler, CheckedCompletionHandler, CheckedResponseHandler
from .manager import EditableModelManager, ModelNotServedError
from .requests import RequestLimits

logger = logging.getLogger(__name__)

__all__ = ["LafnServer", "ServerThread", "build_app", "check_serving_transformers", "load_editable", "serve"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# transformers 5.25 runs each served model in a process of its own (``EngineClient``/``ModelLoader``), which is
# what ``lafn serve`` plugs into; the in-process serving classes of earlier releases are gone there.
SERVING_TRANSFORMERS_FROM = (5, 25)


def check_serving_transformers(version: str | None = None) -> None:
    """Raise ``ImportError`` unless ``version`` (default: the installed transformers) serves each model in a process
    of its own (5.25 or later), which ``lafn serve`` builds on."""
    import transformers

    version = transformers.__version__ if version is None else version
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release < SERVING_TRANSFORMERS_FROM:
        since = ".".join(map(str, SERVING_TRANSFORMERS_FROM))
        raise ImportError(f"lafn serve needs transformers >= {since} (a process per served model), found "
                          f"{version}: pip install 'lafn-hf[serve]' installs a matching one")


@dataclass
class LafnServer:
    """The FastAPI app and the manager of the model it serves (kept for tests and admin calls)."""

    app: Any
    manager: EditableModelManager

    def shutdown(self) -> None:
        """Stop the model's process (the app's shutdown does it too)."""
        self.manager.shutdown()


def build_app(model: str, base_name: str, banks: Sequence[tuple[str, str | os.PathLike[str]]] = (), *,
              dtype: str = "auto", device: str = "auto", continuous_batching: bool = False,
              cb_config: Any = None, admin: bool = True, admin_token: str | None = None, chat_template: str | None = None,
              chat_template_kwargs: dict[str, Any] | None = None, limits: RequestLimits | None = None) -> LafnServer:
    """transformers' OpenAI-compatible app serving ``model`` (see ``engine.resolve_model``), loaded in a process
    of its own, as ``base_name`` (every bank) and ``base_name+<bank>`` per bank in ``banks`` ((name, directory)
    pairs). Returns once the model and banks are loaded (or raises what failed there).

    ``cb_config``: transformers' ``ContinuousBatchingConfig`` for ``continuous_batching``; ``chat_template``
    replaces the tokenizer's (models without one get ``engine.PLAIN_CHAT_TEMPLATE``); ``admin`` adds the
    ``/lafn/banks`` routes, which need ``Authorization: Bearer <admin_token>`` when a token is given.
    """
    check_serving_transformers()
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    specs = [(check_bank_name(name), str(path)) for name, path in banks]
    loader = LafnLoader(resolve_model(model), specs, served_name=base_name, dtype=dtype, device=device,
                        chat_template=chat_template, continuous_batching=continuous_batching)
    state = GenerationState(continuous_batching=continuous_batching, cb_config=cb_config)
    limits = limits or RequestLimits()
    manager = EditableModelManager(loader, base_name, state, [name for name, _ in specs], limits)
    try:
        kwargs = chat_template_kwargs or {}
        handlers = (CheckedChatHandler(manager, state, chat_template_kwargs=kwargs),
                    CheckedCompletionHandler(manager, state),
                    CheckedResponseHandler(manager, state, chat_template_kwargs=kwargs))
        for handler in handlers:
            handler.limits = limits
        app = build_server(
            manager,
            handlers[0],
            completion_handler=handlers[1],
            response_handler=handlers[2],
            transcription_handler=TranscriptionHandler(manager),
            systemone_handler=SystemOneHandler(manager, state, chat_template_kwargs=kwargs),
        )
        # ``/reset`` stops the model's process (transformers starts it again on the next request, without the
        # banks loaded since): this server's one model lives as long as the server
        app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) != "/reset"]
        app.add_exception_handler(ModelNotServedError, _not_served)
        if admin:
            _add_admin_routes(app, manager, admin_token)
    except BaseException:
        manager.shutdown()
        raise
    return LafnServer(app, manager)


async def _not_served(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error", "param": "model",
                                   "code": "model_not_found"}}, status_code=404)


def _add_admin_routes(app: Any, manager: EditableModelManager, token: str | None) -> None:
    """``GET /lafn/banks``; ``POST /lafn/banks`` {"path", "name"?}: load or replace; ``POST /lafn/banks/reload``
    {"name"?}: read again from disk; ``DELETE /lafn/banks/{name}``. They run in the model's process between
    its requests (or beside them, with continuous batching); each forward from then on uses the new banks."""

    def authorize(request: Request) -> None:
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise HTTPException(status_code=401, detail="admin calls need 'Authorization: Bearer <admin token>'")

    async def run(command: str, *args: Any) -> dict[str, Any]:
        try:
            banks = await manager.bank_command(command, *args)
        except ValueError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return {"base": manager.base_name, "models": manager.served_names(),
                "banks": [{**bank, "model": f"{manager.base_name}+{bank['name']}"} for bank in banks]}

    def loaded(name: Any) -> str:
        if name not in manager.bank_names:
            raise HTTPException(status_code=404, detail=f"no bank named {name!r}; loaded: {sorted(manager.bank_names)}")
        return str(name)

    @app.get("/lafn/banks", dependencies=[Depends(authorize)])
    async def list_banks() -> dict[str, Any]:
        return await run("list")

    @app.post("/lafn/banks", dependencies=[Depends(authorize)])
    async def load_bank(body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise HTTPException(status_code=422, detail="body must be {\"path\": DIR, \"name\": optional}")
        name = body.get("name") or Path(path.rstrip("/\\")).name
        try:
            check_bank_name(name)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return await run("load", name, path)

    @app.post("/lafn/banks/reload", dependencies=[Depends(authorize)])
    async def reload_banks(body: dict[str, Any] | None = None) -> dict[str, Any]:
        name = (body or {}).get("name")
        return await run("reload", None if name is None else [loaded(name)])

    @app.delete("/lafn/banks/{name}", dependencies=[Depends(authorize)])
    async def remove_bank(name: str) -> dict[str, Any]:
        return await run("remove", loaded(name))


class ServerThread:
    """uvicorn serving ``app`` on a background thread at ``url`` (tests, benchmarks); ``port`` 0 picks a
    free one. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, int(self._socket.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="lafn-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(model: str, banks: Sequence[str] = (), *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
          device: str = "auto", continuous_batching: bool = False, chat_template: str | None = None,
          admin_token: str | None = None, log_level: str = "info") -> int:
    """``lafn serve``: load ``model`` and the banks (``DIR`` or ``NAME=DIR``) in the model's process, and serve
    until interrupted (or until that process dies)."""
    import uvicorn

    from .banks import parse_bank_spec

    check_serving_transformers()  # before the model loads
    specs = [parse_bank_spec(spec) for spec in banks]
    names = [name for name, _ in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two --bank options have the name(s) {duplicates}; name them with NAME=DIR")
    admin_token = admin_token or os.environ.get("LAFN_ADMIN_TOKEN") or None
    admin = admin_token is not None or host in LOOPBACK_HOSTS
    if not admin:
        logger.warning("admin routes (/lafn/banks) are off: the server listens on %s without --admin-token", host)
    if log_level not in ("debug", "info"):
        logging.getLogger("transformers.cli").setLevel(logging.ERROR)  # one warning line per request
    template = Path(chat_template).read_text("utf-8") if chat_template else None
    server = build_app(model, model, specs, dtype=dtype, device=device, continuous_batching=continuous_batching,
                       admin=admin, admin_token=admin_token, chat_template=template)
    _print_banner(server, model, host, port, admin)

    async def stop_if_the_model_died() -> None:
        if server.manager.is_dead:
            uvicorn_server.should_exit = True

    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                            callback_notify=stop_if_the_model_died, timeout_notify=5)
    uvicorn_server = uvicorn.Server(config)
    try:
        uvicorn_server.run()
    finally:
        server.shutdown()
    if server.manager.is_dead:
        raise RuntimeError(f"the model's process stopped: {server.manager.engine.fatal_error}")
    return 0


def _print_banner(server: LafnServer, model: str, host: str, port: int, admin: bool) -> None:
    config = server.manager.engine.model_config
    print(f"lafn serve: {model} ({config.model_type}) in its own process, {len(server.manager.bank_names)} bank(s)")
    for name in server.manager.served_names():
        selected = "every bank" if name == model else f"bank {name.rpartition('+')[2]!r} only"
        print(f"  model {name!r}: {selected}")
    shown = f"[{host}]" if ":" in host else host
    print(f"  OpenAI API: http://{shown}:{port}/v1" + ("  (admin: /lafn/banks)" if admin else ""), flush=True)
