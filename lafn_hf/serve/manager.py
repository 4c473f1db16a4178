"""The plug into ``transformers serve``: a model manager that hands its handlers an editable model.

transformers' handlers (chat completions, completions, responses) ask the ``ModelManager`` for
``(model, processor)`` by the request's model name, then call ``model.generate`` on one inference thread per
model name. ``EditableModelManager`` answers with a ``BankView`` for the names it serves (``<base>`` and
``<base>+<bank>``) and a 404 for any other name (it never downloads a model). ``EditAwareGenerationState``
keeps continuous batching away from requests whose banks hold entries: CB packs every request into one row
(``input_ids`` of shape (1, total tokens) with ``cu_seq_lens_q``) and its forwards carry no request ids, so
the injector cannot tell which text belongs to which request (it runs packed forwards unedited).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from typing import Any

from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.utils import GenerationState, Modality

from lafn_hf.inject import entries_selected
from lafn_hf.model import EditableCausalLM

from .banks import BankSelection, BankSet

logger = logging.getLogger(__name__)


class ModelNotServedError(LookupError):
    """A request named a model this server does not serve (answered 404, OpenAI's error shape)."""


class BankView:
    """What the handlers get as "the model" for one served name: the base model's attributes, and ``generate``
    run with only the selected entries (``selection`` ``None``: every loaded bank)."""

    def __init__(self, editable: EditableCausalLM, name: str, selection: BankSelection | None) -> None:
        self._editable = editable
        self.served_name = name
        self.selection = selection

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        selected: Container[str] | None = self.selection
        with entries_selected(selected):
            return self._editable.generate(*args, **kwargs)

    def applies_edits(self) -> bool:
        """Whether a request started now may meet a bank entry."""
        if self.selection is None:
            return len(self._editable.bank) > 0
        return self.selection.has_entries()

    def __getattr__(self, name: str) -> Any:  # device, config, generation_config, init_continuous_batching, ...
        if name == "_editable":  # not set yet (copy, unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self._editable.model, name)

    def __repr__(self) -> str:
        return f"BankView({self.served_name!r}, {self.selection!r})"


class EditableModelManager(ModelManager):
    """A ``ModelManager`` that serves one already-built ``EditableCausalLM`` under ``base_name`` and
    ``base_name+<bank>`` for every bank in ``banks``; it never loads or unloads a model."""

    def __init__(self, editable: EditableCausalLM, base_name: str, banks: BankSet, processor: Any = None) -> None:
        super().__init__(model_timeout=-1)  # no inactivity timer: the model is ours, not a cached download
        self.editable = editable
        self.base_name = base_name
        self.banks = banks
        self.processor = processor if processor is not None else editable.tokenizer
        self.created = int(time.time())

    @staticmethod
    def process_model_name(model_id: str) -> str:
        """Names are served exactly as listed (no ``@main`` appended, so responses echo the request's name)."""
        return model_id

    def view(self, name: str) -> BankView | None:
        """The view for a served name, ``None`` for any other name."""
        if name == self.base_name:
            return BankView(self.editable, name, None)
        head, plus, bank = name.rpartition("+")
        if plus and head == self.base_name and bank in self.banks.names():
            return BankView(self.editable, name, self.banks.selection([bank]))
        return None

    def served_names(self) -> list[str]:
        return [self.base_name, *(f"{self.base_name}+{name}" for name in self.banks.names())]

    def load_model_and_processor(self, model_id_and_revision: str, progress_callback: Callable[..., Any] | None = None,
                                 tqdm_class: type | None = None, gguf_file: str | None = None) -> tuple[Any, Any]:
        view = self.view(model_id_and_revision) if gguf_file is None else None
        if view is None:
            shown = model_id_and_revision + (f":{gguf_file}" if gguf_file else "")
            raise ModelNotServedError(f"model {shown!r} is not served here; served: {self.served_names()}")
        if progress_callback is not None:
            progress_callback({"status": "ready", "model": model_id_and_revision, "cached": True})
        return view, self.processor

    def list_models(self, cache_dir: str | None = None) -> list[dict[str, Any]]:
        """``/v1/models``: the base name (every bank) and one ``<base>+<bank>`` per loaded bank (never the
        Hugging Face cache: nothing else is served here)."""
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "lafn",
                 "status": {"value": "loaded"}} for name in self.served_names()]

    get_gen_models = list_models  # the name transformers < 5.24 calls


class EditAwareGenerationState(GenerationState):
    """transformers' generation state, except that a request whose banks hold entries never takes the
    continuous-batching path (decided when the request starts), and all CB requests share one CB manager."""

    def __init__(self, continuous_batching: bool = False, cb_key: str = "lafn-base", **kwargs: Any) -> None:
        super().__init__(continuous_batching=continuous_batching, **kwargs)
        self._cb_key = cb_key
        self._logged = False

    def use_continuous_batching(self, model: Any, modality: Modality) -> bool:
        if not super().use_continuous_batching(model, modality):
            return False
        if isinstance(model, BankView) and model.applies_edits():
            if not self._logged:
                self._logged = True
                logger.warning("lafn serve: continuous batching is off for requests whose banks hold entries "
                               "(they run through generate()): CB packs all requests into one row and its forwards "
                               "carry no request ids, so subjects cannot be mapped per request")
            return False
        return True

    def get_manager(self, model_id: str, use_cb: bool = False) -> Any:
        # One CB manager for every served name: they all share one base model.
        return super().get_manager(self._cb_key if use_cb else model_id, use_cb=use_cb)
