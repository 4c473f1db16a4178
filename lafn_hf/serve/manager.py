"""The plug into ``transformers serve`` (5.25+), in the API server: model names -> the one served model.

transformers' handlers ask the ``ModelManager`` for an engine by the request's model name, read its config
and tokenizer, and send it ``generate`` calls that run in the model's own process. ``EditableModelManager``
starts that process (``LafnLoader``) and answers every name it serves (``<base>``: every bank, ``<base>+<bank>``:
that bank) with an ``EngineView`` of the one engine, which names the request's banks in what it sends
(``lafn_hf.serve.engine``); any other name is a 404 (it never downloads a model). A request on the base name
may choose its banks in its ``generation_config`` (``{"lafn_banks": ["a", "b"]}``, ``[]``: none). The bank
names it serves follow the admin calls it forwards to the model's process (``bank_command``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from transformers.cli.serving.model_manager import EngineClient, ModelManager
from transformers.cli.serving.utils import GenerationState, prompt_length

from .engine import BANKS_KEY, LafnLoader, SelectedPrompt, bank_command
from .requests import LENGTH_FIELD, RequestLimits, bound_length, check_logit_bias

_ABSENT: Any = object()


class ModelNotServedError(LookupError):
    """A request named a model this server does not serve (answered 404, OpenAI's error shape)."""


class EngineView:
    """The engine as handlers use it for one served name: the engine's config, tokenizer and modality, the
    served name as ``model_id``, and each request sent with the names of its banks (``None``: every bank), its
    length bounded first (``requests.bound_length``: the context and the server's ``RequestLimits``)."""

    def __init__(self, engine: EngineClient, name: str, banks: tuple[str, ...] | None,
                 loaded: Sequence[str], limits: RequestLimits | None = None) -> None:
        self._engine = engine
        self.model_id = name
        self.banks = banks
        self._loaded = tuple(loaded)
        self._limits = limits or RequestLimits()

    async def generate_non_streaming(self, inputs: dict[str, Any], generation_kwargs: dict[str, Any]) -> Any:
        return await self._engine.generate_non_streaming(*self._with_banks(inputs, generation_kwargs))

    def generate_streaming(self, inputs: dict[str, Any], generation_kwargs: dict[str, Any],
                           response_parser: Any = None) -> Any:
        return self._engine.generate_streaming(*self._with_banks(inputs, generation_kwargs), response_parser)

    def _with_banks(self, inputs: dict[str, Any], generation_kwargs: dict[str, Any]) -> tuple[dict[str, Any],
                                                                                             dict[str, Any]]:
        # bounded in the handler's own dict, whose max_new_tokens gives the answer's finish_reason
        context = self._engine.generation_state.context_length(self._engine.model_config)
        requested = generation_kwargs.pop(LENGTH_FIELD, None)
        bound_length(generation_kwargs, prompt_length(inputs), context, self._limits, requested)
        check_logit_bias(generation_kwargs, getattr(self._engine.model_config.get_text_config(), "vocab_size", None))
        kwargs = dict(generation_kwargs)
        banks = self._requested(kwargs.pop(BANKS_KEY, _ABSENT))
        kwargs[BANKS_KEY] = banks  # None (every bank) is dropped on the way: generate() then applies every bank
        if self._engine.use_cb:  # continuous batching hands its manager only the prompt: the banks go on it
            inputs = {**inputs, "input_ids": SelectedPrompt(inputs["input_ids"], banks)}
        return inputs, kwargs

    def _requested(self, requested: Any) -> tuple[str, ...] | None:
        """The banks a request applies: its model name's, or on the base name those its generation_config names."""
        if requested is _ABSENT:
            return self.banks
        if self.banks is not None:
            raise ValueError(f"generation_config {BANKS_KEY!r} chooses banks on the base model name only; "
                             f"{self.model_id!r} applies bank {self.banks[0]!r}")
        if not isinstance(requested, list) or not all(isinstance(name, str) for name in requested):
            raise ValueError(f"generation_config {BANKS_KEY!r} must be a list of bank names, got {requested!r}")
        unknown = sorted(set(requested) - set(self._loaded))
        if unknown:
            raise ValueError(f"generation_config {BANKS_KEY!r} names banks {unknown} that are not loaded; "
                             f"loaded: {list(self._loaded)}")
        return tuple(dict.fromkeys(requested))

    def __getattr__(self, name: str) -> Any:  # processor, model_config, generation_config, modality, use_cb, submit
        if name == "_engine":
            raise AttributeError(name)
        return getattr(self._engine, name)

    def __repr__(self) -> str:
        return f"EngineView({self.model_id!r}, banks={self.banks!r})"


class EditableModelManager(ModelManager):
    """Serves one ``EditableCausalLM`` (loaded by ``loader`` in its own process, which starts here) under
    ``base_name`` and ``base_name+<bank>`` for each loaded bank; it never loads another model."""

    def __init__(self, loader: LafnLoader, base_name: str, generation_state: GenerationState | None = None,
                 bank_names: Sequence[str] = (), limits: RequestLimits | None = None) -> None:
        super().__init__(loader, generation_state, model_timeout=-1)
        self.limits = limits or RequestLimits()
        self.base_name = base_name
        self.bank_names = tuple(bank_names)
        self.created = int(time.time())
        self.engine = EngineClient(base_name, loader, self.generation_state)
        self.engines[base_name] = self.engine
        self.engine.start()  # the model's process: loads the model and its banks, or raises

    @staticmethod
    def process_model_name(model_id: str) -> str:
        """Names are served exactly as listed (no ``@main`` appended, so responses echo the request's name)."""
        return model_id

    def view(self, name: str | None) -> EngineView | None:
        """The engine for a served name, ``None`` for any other name."""
        if name == self.base_name:
            return EngineView(self.engine, name, None, self.bank_names, self.limits)
        head, plus, bank = (name or "").rpartition("+")
        if plus and head == self.base_name and bank in self.bank_names:
            return EngineView(self.engine, f"{head}+{bank}", (bank,), self.bank_names, self.limits)
        return None

    def get_engine(self, model: str | None) -> Any:
        view = self.view(model)
        if view is None:
            raise ModelNotServedError(f"model {model!r} is not served here; served: {self.served_names()}")
        return view

    def served_names(self) -> list[str]:
        return [self.base_name, *(f"{self.base_name}+{name}" for name in self.bank_names)]

    def list_models(self, cache_dir: str | None = None) -> list[dict[str, Any]]:
        """``/v1/models``: the base name (every bank) and one ``<base>+<bank>`` per loaded bank (never the
        Hugging Face cache: nothing else is served here)."""
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "lafn",
                 "status": {"value": "loaded"}} for name in self.served_names()]

    async def bank_command(self, command: str, *args: Any) -> list[dict[str, Any]]:
        """Run ``lafn_hf.serve.engine.bank_command`` in the model's process; returns the banks then loaded (and
        serves their names). A ``ValueError`` (bad bank or path) changes nothing."""
        banks: list[dict[str, Any]] = await self.engine.submit(bank_command, command, *args)
        self.bank_names = tuple(bank["name"] for bank in banks)
        return banks
