"""Build the OpenAI-compatible app: transformers' own server and handlers around an ``EditableCausalLM``.

``build_server`` and the handlers come from ``transformers.cli.serving`` unchanged (request validation, chat
templates, SSE streaming, tool-call parsing); lafn adds the model manager of ``manager.py`` and admin routes
under ``/lafn`` to list, load, reload and drop banks while the server runs.
"""

from __future__ import annotations

import asyncio
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

import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from lafn_hf.model import EditableCausalLM

from .banks import BankSet, check_bank_name
from .manager import EditableModelManager, EditAwareGenerationState, ModelNotServedError

logger = logging.getLogger(__name__)

# For models without a chat template (the shipped toy): the messages' text, one per line, after BOS.
PLAIN_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if not loop.first %}\n{% endif %}"
                       "{{ message['content'] }}{% endfor %}")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# transformers 5.25 moved serving into a model process of its own (``EngineClient``): its handlers no longer
# take the generation state, and generation no longer runs on the in-process model this package edits.
SERVING_TRANSFORMERS_BELOW = (5, 25)


def check_serving_transformers(version: str | None = None) -> None:
    """Raise ``ImportError`` unless ``version`` (default: the installed transformers) has the in-process
    serving classes ``lafn serve`` builds on (5.x before 5.25)."""
    import transformers

    version = transformers.__version__ if version is None else version
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release >= SERVING_TRANSFORMERS_BELOW:
        below = ".".join(map(str, SERVING_TRANSFORMERS_BELOW))
        raise ImportError(f"lafn serve needs transformers < {below} (its in-process serving classes), found "
                          f"{version}: pip install 'lafn-hf[serve]' installs a matching one")


def resolve_model(name: str) -> str:
    """``tiny-bilingual`` (shipped), ``gemma-3-270m``/``smollm2-135m`` (offline), else a path or Hub id."""
    from lafn_hf.models import OFFLINE_MODELS, TINY_MODEL, materialize, tiny_model_path

    if name == TINY_MODEL:
        return str(tiny_model_path())
    if name in OFFLINE_MODELS:
        return str(materialize(name))
    return name


def load_editable(model: str, *, dtype: str = "auto", device: str = "auto") -> EditableCausalLM:
    """Load ``model`` (see ``resolve_model``) as an ``EditableCausalLM`` on ``device`` (``auto``: CUDA when
    available, else CPU) in ``dtype`` (``auto``: float32 on CPU, where bf16/fp16 are slow; the checkpoint's
    dtype elsewhere)."""
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        torch_dtype: Any = torch.float32 if target.type == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"--dtype must be auto or a torch dtype such as float32 or bfloat16, got {dtype!r}")
    editable = EditableCausalLM.from_pretrained(resolve_model(model), dtype=torch_dtype)
    editable.model.to(target)
    editable.model.eval()
    return editable


@dataclass
class LafnServer:
    """The FastAPI app and what it serves (kept for tests and admin calls)."""

    app: Any
    manager: EditableModelManager
    banks: BankSet
    generation_state: EditAwareGenerationState

    def shutdown(self) -> None:
        self.generation_state.shutdown()


def build_app(editable: EditableCausalLM, base_name: str, banks: Sequence[tuple[str, Path]] = (), *,
              continuous_batching: bool = False, admin: bool = True, admin_token: str | None = None,
              chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None) -> LafnServer:
    """transformers' OpenAI-compatible app serving ``editable`` as ``base_name`` (every bank) and
    ``base_name+<bank>`` per bank in ``banks`` ((name, directory) pairs).

    ``chat_template`` replaces the tokenizer's (models without one get ``PLAIN_CHAT_TEMPLATE``);
    ``admin`` adds the ``/lafn/banks`` routes, which need ``Authorization: Bearer <admin_token>`` when a
    token is given.
    """
    check_serving_transformers()
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler

    tokenizer = editable.tokenizer
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif getattr(tokenizer, "chat_template", None) is None:
        logger.warning("%s has no chat template: chat requests are rendered as the messages' text, one per line "
                       "(pass --chat-template FILE for another)", base_name)
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    bank_set = BankSet(editable)
    bank_set.load_many(banks)
    manager = EditableModelManager(editable, base_name, bank_set)
    state = EditAwareGenerationState(continuous_batching=continuous_batching, cb_key=base_name)
    template_kwargs = chat_template_kwargs or {}
    app = build_server(
        manager,
        ChatCompletionHandler(manager, state, chat_template_kwargs=template_kwargs),
        completion_handler=CompletionHandler(manager, state),
        response_handler=ResponseHandler(manager, state, chat_template_kwargs=template_kwargs),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(manager, state, chat_template_kwargs=template_kwargs),
        generation_state=state,
    )
    app.add_exception_handler(ModelNotServedError, _not_served)
    if admin:
        _add_admin_routes(app, manager, bank_set, admin_token)
    return LafnServer(app, manager, bank_set, state)


async def _not_served(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error", "param": "model",
                                   "code": "model_not_found"}}, status_code=404)


def _add_admin_routes(app: Any, manager: EditableModelManager, banks: BankSet, token: str | None) -> None:
    """``GET /lafn/banks``; ``POST /lafn/banks`` {"path", "name"?}: load or replace; ``POST /lafn/banks/reload``
    {"name"?}: read again from disk; ``DELETE /lafn/banks/{name}``. Requests already running keep going; each
    forward from then on uses the new banks."""

    def authorize(request: Request) -> None:
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise HTTPException(status_code=401, detail="admin calls need 'Authorization: Bearer <admin token>'")

    def listing() -> dict[str, Any]:
        return {"base": manager.base_name, "models": manager.served_names(),
                "banks": [{**loaded.describe(), "model": f"{manager.base_name}+{loaded.name}"} for loaded in banks]}

    async def run(fn: Any, *args: Any) -> dict[str, Any]:
        try:
            await asyncio.to_thread(fn, *args)
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error.args[0])) from None
        except (ValueError, TypeError, OSError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return listing()

    @app.get("/lafn/banks", dependencies=[Depends(authorize)])
    def list_banks() -> dict[str, Any]:
        return listing()

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
        return await run(banks.load, name, path)

    @app.post("/lafn/banks/reload", dependencies=[Depends(authorize)])
    async def reload_banks(body: dict[str, Any] | None = None) -> dict[str, Any]:
        name = (body or {}).get("name")
        return await run(banks.reload, None if name is None else [name])

    @app.delete("/lafn/banks/{name}", dependencies=[Depends(authorize)])
    async def remove_bank(name: str) -> dict[str, Any]:
        return await run(banks.remove, name)


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
    """``lafn serve``: load ``model``, the banks (``DIR`` or ``NAME=DIR``), and serve until interrupted."""
    import uvicorn

    from .banks import parse_bank_spec

    check_serving_transformers()  # before the model loads

    specs = [parse_bank_spec(spec) for spec in banks]
    admin_token = admin_token or os.environ.get("LAFN_ADMIN_TOKEN") or None
    admin = admin_token is not None or host in LOOPBACK_HOSTS
    if not admin:
        logger.warning("admin routes (/lafn/banks) are off: the server listens on %s without --admin-token", host)
    if log_level not in ("debug", "info"):
        logging.getLogger("transformers.cli.serving").setLevel(logging.ERROR)  # one warning line per request
    template = Path(chat_template).read_text("utf-8") if chat_template else None
    editable = load_editable(model, dtype=dtype, device=device)
    server = build_app(editable, model, specs, continuous_batching=continuous_batching, admin=admin,
                       admin_token=admin_token, chat_template=template)
    parameter = next(editable.model.parameters())
    entries = len(editable.bank)
    print(f"lafn serve: {model} on {parameter.device} ({str(parameter.dtype).removeprefix('torch.')}), "
          f"{len(server.banks)} bank(s), {entries} {'entry' if entries == 1 else 'entries'}")
    for name in server.manager.served_names():
        selected = "every bank" if name == model else f"bank {name.rpartition('+')[2]!r} only"
        print(f"  model {name!r}: {selected}")
    shown = f"[{host}]" if ":" in host else host
    print(f"  OpenAI API: http://{shown}:{port}/v1" + ("  (admin: /lafn/banks)" if admin else ""), flush=True)
    try:
        uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level=log_level)).run()
    finally:
        server.shutdown()
    return 0
