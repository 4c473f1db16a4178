"""Apply dV at inference: hooks on ``mlp.down_proj`` whose input is the neuron values V.

Eq. 10: F'(x) = F_(theta, V + dV)(x) when a bank subject s is found in x, else F(x). The update is added
at the token that completes each subject occurrence in the tokens the model reads (prompt, later turns
and its own generation alike; the causal rule is in ``lafn_hf.routing.matcher``), so decoding with a KV cache
gives what full forwards over the same tokens give, except after a generated subject whose word the next
generated token continues ("Rome" then "o": decoding has fired at "Rome", a full forward reads "Romeo").

Concurrency: what one forward needs (its plan, its rows' readers) lives in a ``contextvars`` context that
the model-level pre-hook sets and the forward hook resets, so threads and asyncio tasks sharing the model
never see each other's plans. The bank is compiled into an immutable snapshot (matcher + device tensors);
a forward uses the snapshot it started with, and a bank change builds a new one.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lafn_hf.modeling import decoder_layers, mlp_parts

from ..bank.entries import EditBank
from ..hooks import unwrapped
from ..routing.cache_rows import cache_argument, cache_length, keep_readers, readers_for, returned_cache
from ..routing.compiled import CompiledBank, concat_plans
from ..routing.config import RoutingConfig
from ..routing.fire import KeyWork
from ..routing.row_reader import RowReader, decoder_for
from ..values import LayerPlan, add_values
from .packed import current_packed_batch, layout_problem, plan_packed, read_packed, shifted

logger = logging.getLogger(__name__)
_OWNER_ATTRIBUTE = "_lafn_injector"  # on the base model: a weak reference to the attached BankInjector
_BANK_OFF: ContextVar[bool] = ContextVar("lafn_bank_off", default=False)
_SELECTED: ContextVar[Container[str] | None] = ContextVar("lafn_selected_entries", default=None)


@contextmanager
def bank_disabled() -> Iterator[None]:
    """Inside the block, forwards of the calling thread/context run without any bank (others are untouched)."""
    token = _BANK_OFF.set(True)
    try:
        yield
    finally:
        _BANK_OFF.reset(token)


@contextmanager
def entries_selected(entry_ids: Container[str] | None) -> Iterator[None]:
    """Inside the block, forwards of the calling thread/context apply only the bank entries whose id is ``in
    entry_ids`` (``None``: all); others are untouched. Asked at every forward, so a live container follows bank
    changes. Rows still read every token, so a KV cache carries on correctly under another selection."""
    token = _SELECTED.set(entry_ids)
    try:
        yield
    finally:
        _SELECTED.reset(token)


@dataclass
class _Forward:
    """What one model forward carries from the pre-hook to the value hooks and the forward hook."""

    plan: dict[int, LayerPlan] | None = None
    readers: list[RowReader] | None = None
    keys: KeyWork | None = None
    packed_keys: list[tuple[int, int, KeyWork]] | None = None  # packed forward: (start, length, work) per request
    token: Token[_Forward | None] | None = field(default=None, repr=False)

    def add(self, per_layer: dict[int, list[LayerPlan]]) -> None:
        """Add plans (a key hook adds them before the layers they update run)."""
        plan = dict(self.plan or {})
        for layer, plans in per_layer.items():
            plan[layer] = LayerPlan.concat([plan[layer], *plans] if layer in plan else plans)
        self.plan = plan or None


_CURRENT: ContextVar[_Forward | None] = ContextVar("lafn_current_forward", default=None)


class BankInjector:
    """Applies an ``EditBank`` to every forward of a model (so ``generate`` and pipelines work).

    A model pre-hook reads each row's new tokens (continuing the readers kept on the KV cache), finds
    completed subjects and puts the plan in the forward's context; pre-hooks on ``down_proj`` of the
    bank's layers add it; a forward hook (``always_call``) stores the readers on the returned cache and
    clears the context. Forwards given ``inputs_embeds`` instead of ``input_ids`` run unedited, and so do packed
    forwards (several sequences in one row, ``cu_seq_lens_q``: continuous batching) unless the engine describes
    them with ``lafn_hf.runtime.packed.packed_batch`` (each request's reader, span and entries).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, bank: EditBank, routing: RoutingConfig | None = None) -> None:
        self._model = model
        self._special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self._special_tensor: dict[torch.device, torch.Tensor] = {}
        self._decode = decoder_for(tokenizer)
        self.bank = bank
        self.routing = routing or RoutingConfig()
        self._handles: list[RemovableHandle] = []
        self._value_handles: dict[int, RemovableHandle] = {}
        self._key_handles: dict[int, RemovableHandle] = {}
        self._compiled: CompiledBank | None = None
        self._lock = threading.Lock()  # guards compiling and (re)attaching value hooks
        self._warned_packed: set[str] = set()
        self.guard: Callable[[EditBank], None] | None = None  # called before each edited forward; may refuse

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def handles(self) -> tuple[RemovableHandle, ...]:
        return (*self._handles, *self._value_handles.values(), *self._key_handles.values())

    def attach(self) -> None:
        """Install the hooks; a model carries at most one attached injector (two would add two banks)."""
        if self._handles:
            return
        owner_ref = getattr(self._model, _OWNER_ATTRIBUTE, None)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None and owner is not self and owner.attached:
            raise ValueError(f"this {type(self._model).__name__} already carries the edit hooks of another "
                             "EditableCausalLM; call .unwrap() on that one first (or keep using it)")
        try:
            object.__setattr__(self._model, _OWNER_ATTRIBUTE, weakref.ref(self))
            self._handles.append(self._model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._handles.append(self._model.register_forward_hook(self._after_forward, always_call=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        with self._lock:
            handles = [*self._handles, *self._value_handles.values(), *self._key_handles.values()]
            self._handles, self._value_handles, self._key_handles, self._compiled = [], {}, {}, None
        for handle in handles:
            handle.remove()
        owner_ref = getattr(self._model, _OWNER_ATTRIBUTE, None)
        if owner_ref is not None and owner_ref() is self:
            object.__delattr__(self._model, _OWNER_ATTRIBUTE)

    def compiled(self, device: torch.device) -> CompiledBank:
        """The snapshot of the current bank version (updated from the last one's, or built, per version)."""
        compiled, routing = self._compiled, self.routing
        if compiled is not None and compiled.version == (self.bank.uid, self.bank.version, device, routing):
            return compiled
        with self._lock:
            compiled = self._compiled
            if (compiled is None or compiled.version[2:] != (device, routing)
                    or (fresh := compiled.updated(self.bank)) is None):
                fresh = CompiledBank.build(self.bank, device, routing)
            self._sync_value_hooks(fresh.layers)
            self._sync_key_hooks(fresh.hook_layers)
            self._compiled = fresh
        return fresh

    def _sync_value_hooks(self, layers: Sequence[int]) -> None:
        """Value hooks on every layer the bank uses (only while the injector is attached).

        Hooks are added, never removed before ``detach``: a forward planned with an older bank may still
        be on its way to a layer the new bank no longer uses (a hook without a plan does nothing).
        """
        if not self._handles:
            return
        modules = decoder_layers(self._model)
        for layer in layers:
            if layer not in self._value_handles:
                down_proj = mlp_parts(modules[layer]).down_proj
                self._value_handles[layer] = down_proj.register_forward_pre_hook(_value_hook_for(layer))

    def _sync_key_hooks(self, layers: Sequence[int]) -> None:
        """Key hooks (pre-hooks of the decoder layers that routing keys read), kept like value hooks."""
        if not self._handles:
            return
        modules = decoder_layers(self._model)
        for layer in layers:
            if layer not in self._key_handles:
                module = unwrapped(modules[layer])  # not an editing thread's temporary stand-in
                self._key_handles[layer] = module.register_forward_pre_hook(_key_hook_for(layer), with_kwargs=True)

    def readers_and_plan(self, compiled: CompiledBank, input_ids: torch.Tensor, attention_mask: Any,
                         cache: Any) -> _Forward:
        """Continue each row's reader over the new tokens and plan dV at completed subjects (the key hooks
        add the representation stage's and the relation choices' plans later in the same forward)."""
        past = cache_length(cache)
        batch, new = input_ids.shape
        readers = readers_for(cache, batch, past, self._decode, self._special_ids)  # continued in place
        mask = _new_token_mask(attention_mask, batch, new)
        ids = input_ids.tolist()
        for row, reader in enumerate(readers):
            reader.read([t if mask is None or mask[row][i] else None for i, t in enumerate(ids[row])])
        selected = _SELECTED.get()
        per_layer, lexical, pending, gated = compiled.lexical_plan(readers, past, selected)
        state = _Forward(plan=concat_plans(per_layer), readers=readers)
        if compiled.keys or compiled.scopes:
            valid = ~torch.isin(input_ids, self._special_ids_on(input_ids.device))
            if mask is not None:
                valid &= torch.tensor(mask, dtype=torch.bool, device=input_ids.device)
            state.keys = KeyWork(compiled, readers, past, valid, lexical, pending, selected, gated)
        return state

    def _special_ids_on(self, device: torch.device) -> torch.Tensor:
        tensor = self._special_tensor.get(device)
        if tensor is None:
            tensor = self._special_tensor[device] = torch.tensor(sorted(self._special_ids), dtype=torch.long,
                                                                 device=device)
        return tensor

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state = _Forward()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        packed = kwargs.get("cu_seq_lens_q") is not None  # several sequences flattened into one row
        if (not _BANK_OFF.get() and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
                and input_ids.shape[1]):
            if self.guard is not None:
                self.guard(self.bank)
            if packed:
                state = self._packed_plan(input_ids, kwargs)
            else:
                compiled = self.compiled(input_ids.device)
                if compiled.entries_of:
                    state = self.readers_and_plan(compiled, input_ids, kwargs.get("attention_mask"),
                                                  cache_argument(kwargs))
        state.token = _CURRENT.set(state)

    def _packed_plan(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> _Forward:
        """A packed forward's plan, per request of its ``packed_batch`` description (none: unedited)."""
        sequences = current_packed_batch()
        problem: str | None = "no lafn_hf.runtime.packed.packed_batch describes its requests"
        if sequences is not None:
            problem = layout_problem(sequences, kwargs["cu_seq_lens_q"], kwargs.get("position_ids"), input_ids.shape[1])
        if sequences is None or problem is not None:
            kind = "undescribed" if sequences is None else "mismatch"  # warned once each, then at debug level
            level = logging.DEBUG if kind in self._warned_packed or not len(self.bank) else logging.WARNING
            self._warned_packed.add(kind)
            logger.log(level, "a forward of packed sequences (cu_seq_lens_q: continuous batching, generate_batch, "
                       "flattened collators) runs without the edit bank: %s", problem)
            return _Forward()
        compiled = self.compiled(input_ids.device)
        if not compiled.entries_of:
            read_packed(input_ids, sequences)
            return _Forward()
        per_layer, work = plan_packed(compiled, input_ids, sequences, self._special_ids_on(input_ids.device))
        return _Forward(plan=concat_plans(per_layer), packed_keys=work or None)

    def _after_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        state = _CURRENT.get()
        if state is None or state.token is None:
            return
        _CURRENT.reset(state.token)
        if state.readers is not None:
            keep_readers(returned_cache(output), state.readers)


def _value_hook_for(layer: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        state = _CURRENT.get()
        plan = state.plan.get(layer) if state is not None and state.plan else None
        return None if plan is None else (add_values(args[0], plan), *args[1:])

    return hook


def _key_hook_for(layer: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state = _CURRENT.get()
        work = state.keys if state is not None else None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if state is not None and state.packed_keys and isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            for start, length, request in state.packed_keys:  # one request's tokens of the packed row
                added = request.route(layer, hidden[:, start : start + length])
                if added:
                    state.add(shifted(added, start))
        if work is None:
            return
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(work.valid.shape):
            added = work.route(layer, hidden)
            if added and state is not None:
                state.add(added)

    return hook


def _new_token_mask(attention_mask: Any, batch: int, new: int) -> list[list[int]] | None:
    """The 2-D attention mask's columns for the new tokens (``None``: every new token is real)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        return None
    if attention_mask.shape[1] < new:
        return None
    return attention_mask[:, attention_mask.shape[1] - new :].tolist()
