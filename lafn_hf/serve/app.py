"""Build the OpenAI-compatible app: transformers' own server and handlers around an edited model's process.

``build_server`` and the handlers come from ``transformers.cli.serving`` (5.25+) (chat templates, SSE streaming,
tool-call parsing, prompt length checks), the handlers with every field checked first (``handlers.py``); lafn adds
the model manager of ``manager.py`` (the model and its banks live in a process of their own, ``engine.py``) and
admin routes under ``/lafn`` to list, load, reload and drop banks while the server runs (``admin.py``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from .admin import AdminSettings, add_admin_routes
from .banks import check_bank_name
from .engine import LafnLoader, load_editable, resolve_model
from .handlers import CheckedChatHandler, CheckedCompletionHandler, CheckedResponseHandler
from .manager import EditableModelManager, ModelNotServedError
from .requests import RequestLimits

logger = logging.getLogger(__name__)

__all__ = ["LafnServer", "ServerThread", "build_app", "check_serving_transformers", "load_editable", "serve"]

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
    admin: AdminSettings | None = None  # None: no admin routes

    def shutdown(self) -> None:
        """Stop the model's process (the app's shutdown does it too)."""
        self.manager.shutdown()


def build_app(model: str, base_name: str, banks: Sequence[tuple[str, str | os.PathLike[str]]] = (), *,
              dtype: str = "auto", device: str = "auto", continuous_batching: bool = False,
              cb_config: Any = None, admin: bool = True, admin_token: str | None = None, host: str = "127.0.0.1",
              allowed_hosts: Sequence[str] = (), chat_template: str | None = None,
              chat_template_kwargs: dict[str, Any] | None = None, limits: RequestLimits | None = None) -> LafnServer:
    """transformers' OpenAI-compatible app serving ``model`` (see ``engine.resolve_model``), loaded in a process
    of its own, as ``base_name`` (every bank) and ``base_name+<bank>`` per bank in ``banks`` ((name, directory)
    pairs). Returns once the model and banks are loaded (or raises what failed there).

    ``cb_config``: transformers' ``ContinuousBatchingConfig`` for ``continuous_batching``; ``chat_template``
    replaces the tokenizer's (models without one get ``engine.PLAIN_CHAT_TEMPLATE``); ``admin`` adds the
    ``/lafn/banks`` routes (``admin.py``), which need ``Authorization: Bearer <admin_token>`` (default: a new
    random token, in the result's ``admin``) and a ``Host`` header naming ``host`` (the address served) or one
    of ``allowed_hosts``; ``limits`` bounds what one request may generate (``requests.RequestLimits``).
    """
    check_serving_transformers()
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    specs = [(check_bank_name(name), str(path)) for name, path in banks]
    settings = AdminSettings.for_host(host, admin_token, allowed_hosts) if admin else None
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
        if settings is not None:
            add_admin_routes(app, manager, settings)
    except BaseException:
        manager.shutdown()
        raise
    return LafnServer(app, manager, settings)


async def _not_served(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error", "param": "model",
                                   "code": "model_not_found"}}, status_code=404)


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
          admin: bool = True, admin_token: str | None = None, admin_token_file: str | os.PathLike[str] | None = None,
          allowed_hosts: Sequence[str] = (), limits: RequestLimits | None = None, log_level: str = "info") -> int:
    """``lafn serve``: load ``model`` and the banks (``DIR`` or ``NAME=DIR``) in the model's process, and serve
    until interrupted (or until that process dies). Without ``admin_token`` (or ``$LAFN_ADMIN_TOKEN``) the admin
    routes get a new token, printed and written to ``admin_token_file`` (default: ``token_file(port)``, mode 0600,
    removed at exit); ``admin=False`` leaves the routes out."""
    import uvicorn

    from .banks import parse_bank_spec

    check_serving_transformers()  # before the model loads
    specs = [parse_bank_spec(spec) for spec in banks]
    names = [name for name, _ in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two --bank options have the name(s) {duplicates}; name them with NAME=DIR")
    admin_token = admin_token or os.environ.get("LAFN_ADMIN_TOKEN") or None
    if admin and admin_token is not None:
        AdminSettings(admin_token)  # a bad token fails before the model loads
    if log_level not in ("debug", "info"):
        logging.getLogger("transformers.cli").setLevel(logging.ERROR)  # one warning line per request
    template = Path(chat_template).read_text("utf-8") if chat_template else None
    server = build_app(model, model, specs, dtype=dtype, device=device, continuous_batching=continuous_batching,
                       admin=admin, admin_token=admin_token, host=host, allowed_hosts=allowed_hosts,
                       chat_template=template, limits=limits)
    written = None
    # uvicorn re-raises the SIGTERM it stopped on, once its handlers are gone: as SystemExit, so the finally runs
    stopping = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if stopping else None
    try:
        if server.admin is not None and admin_token is None:
            written = write_token(token_file(port) if admin_token_file is None else Path(admin_token_file),
                                  server.admin.token)
        _print_banner(server, model, host, port, written)

        async def stop_if_the_model_died() -> None:
            if server.manager.is_dead:
                uvicorn_server.should_exit = True

        config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                                callback_notify=stop_if_the_model_died, timeout_notify=5)
        uvicorn_server = uvicorn.Server(config)
        uvicorn_server.run()
    finally:
        server.shutdown()
        if written is not None:
            written.unlink(missing_ok=True)
        if stopping:
            signal.signal(signal.SIGTERM, previous)
    if server.manager.is_dead:
        raise RuntimeError(f"the model's process stopped: {server.manager.engine.fatal_error}")
    return 0


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def token_file(port: int) -> Path:
    """Where ``lafn serve`` writes the admin token it made: ``$XDG_RUNTIME_DIR/lafn_hf`` (else
    ``~/.cache/lafn_hf``), ``serve-<port>.token``."""
    root = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
    return Path(root) / "lafn_hf" / f"serve-{port}.token"


def write_token(path: Path, token: str) -> Path:
    """Write ``token`` to ``path``, readable by this user only (0600; a link there is refused)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(descriptor, 0o600)  # the file may have been there with a wider mode
        os.write(descriptor, f"{token}\n".encode())
    finally:
        os.close(descriptor)
    return path


def _print_banner(server: LafnServer, model: str, host: str, port: int, token_path: Path | None) -> None:
    config = server.manager.engine.model_config
    print(f"lafn serve: {model} ({config.model_type}) in its own process, {len(server.manager.bank_names)} bank(s)")
    for name in server.manager.served_names():
        selected = "every bank" if name == model else f"bank {name.rpartition('+')[2]!r} only"
        print(f"  model {name!r}: {selected}")
    shown = f"[{host}]" if ":" in host else host
    print(f"  OpenAI API: http://{shown}:{port}/v1", flush=True)
    if server.admin is None:
        print("  admin routes: off (--no-admin)", flush=True)
    elif token_path is not None:
        print(f"  admin: http://{shown}:{port}/lafn/banks with 'Authorization: Bearer {server.admin.token}' "
              f"(also in {token_path}, mode 0600)", flush=True)
    else:
        print(f"  admin: http://{shown}:{port}/lafn/banks with 'Authorization: Bearer <--admin-token>'", flush=True)
