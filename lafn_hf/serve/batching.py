"""Continuous batching with banks, in the served model's process.

transformers' batching manager packs every scheduled request into one row (``input_ids`` (1, total new tokens),
``cu_seq_lens_q``, ``position_ids``), and its forwards carry no request ids. ``BankedBatching`` wraps the
manager: it records each request's banks when the request is added (from its ``SelectedPrompt``), and a
forward pre-hook on the model describes every packed forward of this manager to the injector
(``lafn_hf.runtime.packed.packed_batch``) from the manager's batch in progress, in packing order: each request's
reader (kept across its forwards, rebuilt from its tokens when needed), span and entries. The injector checks
the description against ``cu_seq_lens_q`` and ``position_ids`` before editing.

What this reads of transformers' internals (5.25): ``manager.batch_processor`` (its ``cache``, which the
forward receives, and ``inputs_and_outputs.requests_in_batch``, the batch's ``FutureRequestState``s in packing
order, set by ``prepare_batch_tensors`` just before the forward on the same thread), and per request
``state.request_id``, ``state.position_offset`` (already past the new tokens), ``query_length``,
``state.initial_tokens`` and ``state.generated_tokens``. Prefix sharing is turned off (a shared block's keys
and values hold the edits of the request that computed it), and so are CUDA graphs, asynchronous batching and
compilation, which would replay or overlap forwards the injector plans on the host one at a time.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Container
from contextvars import Token
from functools import partial
from typing import Any

from lafn_hf.runtime.packed import PackedSequence, RequestReaders, enter_packed_batch, leave_packed_batch

logger = logging.getLogger(__name__)
_NOTHING: frozenset[str] = frozenset()  # the entries of a request whose banks are not known here
_UNKNOWN: Any = object()
# (setting, value with banks): what each would do is in the module docstring
BANKED_SETTINGS = {"allow_block_sharing": False, "use_async_batching": False, "use_cuda_graph": False,
                   "varlen_compile_config": None, "decode_compile_config": None}


def banked_config(config: Any) -> Any:
    """A copy of a ``ContinuousBatchingConfig`` (``None``: the default) with ``BANKED_SETTINGS``."""
    from transformers import ContinuousBatchingConfig

    banked = copy.copy(config) if config is not None else ContinuousBatchingConfig()
    changed = [name for name, value in BANKED_SETTINGS.items() if getattr(banked, name, value) not in (value, None)]
    for name, value in BANKED_SETTINGS.items():
        setattr(banked, name, value)
    if changed:
        logger.warning("continuous batching with edit banks: %s turned off (lafn_hf.serve.batching says why)",
                       ", ".join(changed))
    return banked


class BankedBatching:
    """transformers' ``ContinuousBatchingManager`` of a ``ServedModel`` whose requests each apply their own banks.

    Every request must come as a ``SelectedPrompt``; ``stop`` removes the model hooks (the manager's other
    attributes pass through)."""

    def __init__(self, manager: Any, served: Any) -> None:
        self._manager = manager
        self._served = served
        self._selected: dict[str, Container[str] | None] = {}
        self._lock = threading.Lock()
        self._readers = RequestReaders(served.editable.tokenizer)
        self._local = threading.local()
        model = served.editable.model
        self._handles = [model.register_forward_pre_hook(self._describe, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._described, always_call=True)]

    def add_request(self, input_ids: Any, request_id: str | None = None, **kwargs: Any) -> Any:
        banks = getattr(input_ids, "banks", _UNKNOWN)
        if banks is _UNKNOWN or request_id is None:
            raise RuntimeError("lafn serve: a continuous-batching request came without its bank selection or id "
                               f"(prompt of type {type(input_ids).__name__}, id {request_id!r}); its banks are unknown")
        with self._lock:
            self._selected[request_id] = self._served.selection(banks)
        try:
            return self._manager.add_request(input_ids, request_id=request_id, **kwargs)
        except BaseException:
            self._forget(request_id)
            raise

    def cancel_request(self, request_id: str) -> None:
        self._manager.cancel_request(request_id)
        self._forget(request_id)

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> Any:
        output = self._manager.get_result(request_id=request_id, timeout=timeout)
        if output is not None and (output.error is not None or output.is_finished()):
            self._forget(output.request_id)
        return output

    def stop(self, *args: Any, **kwargs: Any) -> Any:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self._manager.stop(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # warmup, start, batch_processor, logit_processor, ...
        if name == "_manager":
            raise AttributeError(name)
        return getattr(self._manager, name)

    def active(self) -> int:
        """Requests whose banks and reader are held (added and not yet finished or cancelled)."""
        return len(self._selected)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._selected.pop(request_id, None)
        self._readers.drop(request_id)

    def _describe(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pre-hook: a packed forward of this manager is described while it runs (the forward hook resets it)."""
        stack = getattr(self._local, "tokens", None)
        if stack is None:
            stack = self._local.tokens = []
        stack.append(self._enter(kwargs))

    def _described(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        stack = getattr(self._local, "tokens", None)
        token = stack.pop() if stack else None
        if token is not None:
            leave_packed_batch(token)

    def _enter(self, kwargs: dict[str, Any]) -> Token[tuple[PackedSequence, ...] | None] | None:
        processor = getattr(self._manager, "batch_processor", None)
        if processor is None or kwargs.get("cu_seq_lens_q") is None or kwargs.get("cache") is not processor.cache:
            return None  # not a forward of this manager
        batch = getattr(processor.inputs_and_outputs, "requests_in_batch", None)
        if batch is None:
            return None  # an IO layout this module does not know: the injector runs the forward unedited, and says so
        sequences, start = [], 0
        with self._lock:  # a request not added here (warm-up), or finished or cancelled meanwhile: no entries
            chosen = [self._selected.get(future.state.request_id, _UNKNOWN) for future in batch]
        for future, selected in zip(batch, chosen):
            state, length = future.state, future.query_length
            reader = self._readers.reader(state.request_id, state.position_offset - length, partial(_tokens, state),
                                          keep=selected is not _UNKNOWN)
            sequences.append(PackedSequence(reader, start, length, _NOTHING if selected is _UNKNOWN else selected))
            start += length
        return enter_packed_batch(sequences)


def _tokens(state: Any) -> list[int]:
    """A batching request's tokens so far (its prompt, with what it generated before a restart, then since)."""
    return [*state.initial_tokens, *state.generated_tokens]
