"""``lafn serve``: edit banks behind transformers' OpenAI-compatible server (``pip install 'lafn-hf[serve]'``).

- ``banks.py``: the named banks one server holds, merged into the model's bank with per-entry owners, and
  the live selection a request applies (``<base>+<bank>``); load / reload / remove, all or nothing.
- ``manager.py``: the plug into ``transformers.cli.serving``: a ``ModelManager`` that serves one
  ``EditableCausalLM`` by name, the ``BankView`` its handlers call ``generate`` on, and the generation state
  that keeps continuous batching away from edited requests.
- ``app.py``: ``build_app`` (transformers' ``build_server`` + ``/lafn/banks`` admin routes), ``ServerThread``
  (in-process server for tests and benchmarks) and ``serve`` (the command).

Nothing outside this package imports it; the core library never needs fastapi, uvicorn or openai.
"""

from __future__ import annotations

import importlib.util

_EXTRAS = ("fastapi", "uvicorn", "openai", "pydantic")
_missing = [name for name in _EXTRAS if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"lafn serve needs {', '.join(_missing)}: pip install 'lafn-hf[serve]'")

from .app import LafnServer, ServerThread, build_app, load_editable, serve  # noqa: E402
from .banks import BankSelection, BankSet, parse_bank_spec  # noqa: E402
from .manager import BankView, EditableModelManager, EditAwareGenerationState  # noqa: E402

__all__ = [
    "BankSelection",
    "BankSet",
    "BankView",
    "EditAwareGenerationState",
    "EditableModelManager",
    "LafnServer",
    "ServerThread",
    "build_app",
    "load_editable",
    "parse_bank_spec",
    "serve",
]
