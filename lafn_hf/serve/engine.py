"""The served model's own process: transformers (5.25+) runs each served model in a process it spawns, which
loads the model with a copy of the server's ``ModelLoader`` and generates for every API server.

``LafnLoader`` is that loader: in the model's process it builds the ``EditableCausalLM`` and its ``BankSet``
and hands transformers' runner a ``ServedModel``; in the API server it only reads the config and the
tokenizer. A request's banks reach the model's process with the request: ``generate()`` takes them as the
generation keyword ``lafn_banks`` (names, or absent: every bank), and continuous batching, whose runner passes
the batching manager nothing of a request but its prompt ids, id, length and sampling settings, finds them on
the prompt's ids (``SelectedPrompt``). Admin changes to the banks run there too (``bank_command``, through
the engine's ``submit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.cli.serving.model_manager import ModelLoader

from lafn_hf.model import EditableCausalLM
from lafn_hf.runtime.inject import entries_selected

from .banks import BankSet

logger = logging.getLogger(__name__)

BANKS_KEY = "lafn_banks"  # generation keyword: the names of the banks a request applies (absent: every bank)
# For models without a chat template (the shipped toy): the messages' text, one per line, after BOS.
PLAIN_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if not loop.first %}\n{% endif %}"
                       "{{ message['content'] }}{% endfor %}")


class SelectedPrompt(list):  # type: ignore[type-arg]
    """A prompt's token ids that also carry the names of the banks its request applies (``None``: every bank)."""

    def __init__(self, ids: Iterable[int], banks: tuple[str, ...] | None) -> None:
        super().__init__(ids)
        self.banks = banks

    def __reduce__(self) -> tuple[type[SelectedPrompt], tuple[list[int], tuple[str, ...] | None]]:
        return SelectedPrompt, (list(self), self.banks)


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
    editable = EditableCausalLM.from_pretrained(resolve_model(model), dtype=torch_dtype(dtype, target))
    editable.model.to(target)
    editable.model.eval()
    return editable


def torch_dtype(dtype: str, device: torch.device) -> Any:
    """``--dtype``: ``auto`` is float32 on CPU and the checkpoint's dtype elsewhere."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"--dtype must be auto or a torch dtype such as float32 or bfloat16, got {dtype!r}")
    return resolved


def with_chat_template(tokenizer: Any, template: str | None, warn_as: str | None = None) -> Any:
    """``tokenizer`` with ``template`` (default: its own, else ``PLAIN_CHAT_TEMPLATE``, warned about once
    under the name ``warn_as``)."""
    if template is not None:
        tokenizer.chat_template = template
    elif getattr(tokenizer, "chat_template", None) is None:
        if warn_as is not None:
            logger.warning("%s has no chat template: chat requests are rendered as the messages' text, one per line "
                           "(pass --chat-template FILE for another)", warn_as)
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


class LafnLoader(ModelLoader):
    """How the served model loads: ``model`` (a path or Hub id, resolved) as an ``EditableCausalLM`` with the
    banks ``banks`` ((name, directory) pairs), in its own process; pickled into it by transformers."""

    def __init__(self, model: str, banks: Sequence[tuple[str, str]] = (), *, served_name: str, dtype: str = "auto",
                 device: str = "auto", chat_template: str | None = None, continuous_batching: bool = False) -> None:
        super().__init__(continuous_batching=continuous_batching)
        torch_dtype(dtype, torch.device("cpu"))  # a bad --dtype fails here, before a process starts
        self.model, self.banks, self.served_name = model, [(name, str(path)) for name, path in banks], served_name
        self.editable_dtype, self.editable_device, self.chat_template = dtype, device, chat_template

    def load_config(self, model_id: str) -> Any:
        return super().load_config(self.model)

    def load_processor(self, model_id: str) -> Any:
        from transformers import AutoTokenizer

        return with_chat_template(AutoTokenizer.from_pretrained(self.model), self.chat_template, self.served_name)

    def load_model_and_processor(self, model_id: str, on_progress: Callable[..., Any] | None = None) -> Any:
        """In the model's process: the editable model with its banks (every bank checked before it serves)."""
        if on_progress is not None:
            on_progress({"status": "loading", "model": self.served_name, "stage": "model"})
        editable = load_editable(self.model, dtype=self.editable_dtype, device=self.editable_device)
        with_chat_template(editable.tokenizer, self.chat_template)
        banks = BankSet(editable)
        banks.load_many([(name, Path(path)) for name, path in self.banks])
        return ServedModel(editable, banks), editable.tokenizer


class ServedModel:
    """The model transformers' runner serves: the base model's attributes, ``generate`` with the request's
    banks (``lafn_banks``), and continuous batching whose requests each apply their own banks."""

    def __init__(self, editable: EditableCausalLM, banks: BankSet) -> None:
        self.editable = editable
        self.banks = banks
        self.batching: Any = None  # the BankedBatching, once started

    def selection(self, names: Sequence[str] | None) -> Container[str] | None:
        """The entries a request naming the banks ``names`` applies (``None``: every bank, live)."""
        return None if names is None else self.banks.selection(names)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        selected = self.selection(kwargs.pop(BANKS_KEY, None))
        with entries_selected(selected):
            return self.editable.generate(*args, **kwargs)

    def init_continuous_batching(self, **kwargs: Any) -> Any:
        """transformers' batching manager for this model, in a ``BankedBatching`` (see there)."""
        from .batching import BankedBatching, banked_config

        kwargs["continuous_batching_config"] = banked_config(kwargs.get("continuous_batching_config"))
        model: Any = self.editable.model
        self.batching = BankedBatching(model.init_continuous_batching(**kwargs), self)
        return self.batching

    def __getattr__(self, name: str) -> Any:  # device, config, dtype, generation_config, ...
        if name == "editable":  # not set yet (copy, unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.editable.model, name)


def bank_command(model: ServedModel, processor: Any, command: str, *args: Any) -> list[dict[str, Any]]:
    """Runs in the model's process (``EngineClient.submit``): ``list``, ``load`` (name, path), ``reload``
    (names or ``None``: all) or ``remove`` (name); returns the banks then loaded. A bad bank or path is a
    ``ValueError`` (it crosses to the API server as one: a 400), and changes nothing."""
    banks = model.banks
    try:
        if command == "load":
            banks.load(args[0], args[1])
        elif command == "reload":
            banks.reload(args[0])
        elif command == "remove":
            banks.remove(args[0])
        elif command != "list":
            raise ValueError(f"unknown bank command {command!r}")
    except KeyError as error:
        raise ValueError(str(error.args[0])) from None
    except (TypeError, OSError) as error:
        raise ValueError(str(error)) from None
    return [loaded.describe() for loaded in banks]
