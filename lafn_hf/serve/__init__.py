"""``lafn serve``: edit banks behind transformers' OpenAI-compatible server (``pip install 'lafn-hf[serve]'``,
transformers 5.25 or later, which runs each served model in a process of its own).

- ``banks.py``: the named banks one server holds, merged into the model's bank with per-entry owners, and
  the live selection a request applies (``<base>+<bank>``); load / reload / remove, all or nothing.
- ``engine.py``: the model's process: ``LafnLoader`` builds the ``EditableCausalLM`` and its banks there, and
  ``ServedModel`` generates with each request's banks; ``bank_command`` runs the admin changes there.
- ``batching.py``: continuous batching in the model's process, each packed request with its own banks.
- ``manager.py``: the API server's side: the ``ModelManager`` that starts the model's process and answers
  every served name with an ``EngineView`` that sends the request's banks along.
- ``requests.py``: what a request may ask (every field checked, a 400 naming it; lengths within the context and
  ``RequestLimits``); ``handlers.py``: transformers' handlers with those checks first.
- ``admin.py``: the ``/lafn/banks`` admin routes, closed by default (token, ``Host``, no ``Origin``; errors
  without values read from disk). Threat model: docs/serving.md.
- ``app.py``: ``build_app`` (transformers' ``build_server`` + the checked handlers + the admin routes),
  ``ServerThread`` (in-process API server for tests and benchmarks) and ``serve`` (the command).

Nothing outside this package imports it; the core library never needs fastapi, uvicorn or openai.
"""

from __future__ import annotations

import importlib.util

_EXTRAS = ("fastapi", "uvicorn", "openai", "pydantic")
_missing = [name for name in _EXTRAS if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"lafn serve needs {', '.join(_missing)}: pip install 'lafn-hf[serve]'")

from .admin import AdminSettings  # noqa: E402
from .app import LafnServer, ServerThread, build_app, load_editable, serve  # noqa: E402
from .banks import BankSelection, BankSet, parse_bank_spec  # noqa: E402
from .engine import LafnLoader, SelectedPrompt, ServedModel  # noqa: E402
from .manager import EditableModelManager, EngineView  # noqa: E402
from .requests import RequestLimits  # noqa: E402

__all__ = [
    "AdminSettings",
    "BankSelection",
    "BankSet",
    "EditableModelManager",
    "EngineView",
    "LafnLoader",
    "LafnServer",
    "RequestLimits",
    "SelectedPrompt",
    "ServedModel",
    "ServerThread",
    "build_app",
    "load_editable",
    "parse_bank_spec",
    "serve",
]
