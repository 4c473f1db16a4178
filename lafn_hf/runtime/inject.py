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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lafn_hf.modeling import decoder_layers, mlp_parts

from ..bank.entries import BankEntry, EditBank, KeySpace, QuestionScope, RoutingKey
from ..hooks import unwrapped
from ..routing.cache_rows import cache_argument, cache_length, keep_readers, readers_for, returned_cache
from ..routing.config import RoutingConfig
from ..routing.fire import Gated, KeyIndex, KeyWork, Pending
from ..routing.matcher import SubjectMatcher
from ..routing.row_reader import RowReader, decoder_for
from ..routing.scope import ScopeIndex
from ..routing.trace import Route, record, tracing_active
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


@dataclass(frozen=True)
class CompiledBank:
    """An immutable view of one bank version under one ``RoutingConfig``: matcher, surface form -> entry ids,
    device tensors, routing keys (their per-layer ``KeyIndex`` built on first use).

    ``build`` compiles a whole bank; ``updated`` derives the next version from the bank's change log
    without recompiling what did not change (the matcher grows by a small automaton; subjects left without
    entries stay in it and simply plan nothing).
    """

    version: tuple[int, int, torch.device, RoutingConfig]
    matcher: SubjectMatcher
    entries_of: dict[str, tuple[str, ...]]
    updates: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]  # entry -> layer -> (neurons, delta)
    layer_entries: dict[int, int]  # layer -> how many entries update it
    keys: dict[str, RoutingKey] = field(default_factory=dict)  # entry -> key (representation stage on)
    # subject -> the entries for which it is a subject in an inflecting language (``RoutingConfig.inflects``):
    # only they fire where it is found inflected
    inflected: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scopes: dict[str, QuestionScope] = field(default_factory=dict)  # entry -> question scope (scope stage on)
    _indices: dict[int, list[KeyIndex]] = field(default_factory=dict, compare=False, repr=False)
    _scope_indices: dict[str, ScopeIndex] = field(default_factory=dict, compare=False, repr=False)
    _scope_templates: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.layer_entries))

    @property
    def routing(self) -> RoutingConfig:
        return self.version[3]

    @property
    def key_layers(self) -> tuple[int, ...]:
        return tuple(sorted({key.layer for key in self.keys.values()}))

    @property
    def hook_layers(self) -> tuple[int, ...]:
        """The layers whose input the routing reads: keys' and question scopes'."""
        return tuple(sorted({*self.key_layers, *(scope.layer for scope in self.scopes.values())}))

    def scope_index(self, entry_id: str) -> ScopeIndex:
        """The entry's question scope on the device (built once per compiled version)."""
        index = self._scope_indices.get(entry_id)
        if index is None:
            scope = self.scopes[entry_id]
            templates = self._scope_templates.get(id(scope.space))
            if templates is None:  # once per space: entries made together share it
                templates = self._scope_templates[id(scope.space)] = scope.space.templates.to(self.version[2])
            index = self._scope_indices[entry_id] = ScopeIndex(scope, templates, self.routing.scope_margin_override)
        return index

    def key_indices(self, layer: int) -> list[KeyIndex]:
        """The keys of ``layer`` on the device, one index per key space (built once per compiled version)."""
        if layer not in self._indices:
            by_space: dict[int, tuple[KeySpace, list[tuple[str, RoutingKey]]]] = {}
            for entry_id, key in self.keys.items():
                if key.layer == layer:
                    by_space.setdefault(id(key.space), (key.space, []))[1].append((entry_id, key))
            self._indices[layer] = [KeyIndex.build(space, keys, self.version[2], self.routing.threshold)
                                    for space, keys in by_space.values()]
        return self._indices[layer]

    @classmethod
    def build(cls, bank: EditBank, device: torch.device, routing: RoutingConfig | None = None) -> CompiledBank:
        routing = routing or RoutingConfig()
        number, entries = bank.snapshot()
        spellings = routing.spellings and routing.normalize
        empty = cls((bank.uid, -1, device, routing), SubjectMatcher(fold=routing.normalize, spellings=spellings),
                    {}, {}, {}, {})
        compiled = empty._apply([("add", entry) for entry in entries], number, grow_matcher=False)
        matcher = SubjectMatcher(compiled.entries_of, fold=routing.normalize, inflected=compiled.inflected,
                                 spellings=spellings)
        return replace(compiled, matcher=matcher, _indices={}, _scope_indices={}, _scope_templates={})

    def updated(self, bank: EditBank) -> CompiledBank | None:
        """The bank's current version from this one by replaying its changes (``None``: rebuild instead)."""
        changes = bank.changes_since(self.version[1]) if self.version[0] == bank.uid else None
        if changes is None:
            return None
        number, log = changes
        stale = len(self.matcher) - len(self.entries_of)
        if stale > max(1024, len(self.entries_of) // 4):  # many removed subjects still in the automata
            return None
        return self._apply(log, number, grow_matcher=True)

    def _apply(self, changes: Sequence[tuple[str, BankEntry]], number: int, grow_matcher: bool) -> CompiledBank:
        device, routing = self.version[2], self.routing
        entries_of, updates, layer_entries = dict(self.entries_of), dict(self.updates), dict(self.layer_entries)
        keys, scopes = dict(self.keys), dict(self.scopes)
        added: list[str] = []
        inflected, newly_inflected = dict(self.inflected), []
        for op, entry in changes:
            step = 1 if op == "add" else -1
            for layer in entry.updates:
                layer_entries[layer] = layer_entries.get(layer, 0) + step
                if not layer_entries[layer]:
                    del layer_entries[layer]
            forms = entry.surface_forms if routing.aliases else tuple(dict.fromkeys(entry.subjects.values()))
            for subject in forms:
                ids = tuple(i for i in entries_of.get(subject, ()) if i != entry.id)
                ids = (*ids, entry.id) if step > 0 else ids
                if ids:
                    entries_of[subject] = ids
                else:
                    entries_of.pop(subject, None)
            keys.pop(entry.id, None)
            scopes.pop(entry.id, None)
            for subject in {s for lang, s in entry.subjects.items() if routing.inflects(lang)}:
                ids = tuple(i for i in inflected.get(subject, ()) if i != entry.id)
                ids = (*ids, entry.id) if step > 0 else ids
                if ids:
                    newly_inflected += [subject] if subject not in inflected else []
                    inflected[subject] = ids
                else:
                    inflected.pop(subject, None)
            if step > 0:
                added += forms
                updates[entry.id] = {layer: (u.neurons.to(device), u.delta.to(device)) for layer, u in entry.updates.items()}
                if routing.representation and entry.key is not None:
                    keys[entry.id] = entry.key
                if routing.scope and entry.scope is not None:
                    scopes[entry.id] = entry.scope
            else:
                updates.pop(entry.id, None)
        matcher = self.matcher.with_subjects(added, newly_inflected) if grow_matcher else self.matcher
        return CompiledBank((self.version[0], number, device, routing), matcher, entries_of, updates, layer_entries,
                            keys, inflected, scopes)

    def add_entry_plan(self, per_layer: dict[int, list[LayerPlan]], entry_id: str, row: int, position: int) -> None:
        for layer, (neurons, delta) in self.updates[entry_id].items():
            per_layer.setdefault(layer, []).append(LayerPlan.build([(row, position)], neurons, delta))

    def lexical_plan(self, rows: Sequence[RowReader], first: int, selected: Container[str] | None = None,
                     ) -> tuple[dict[int, list[LayerPlan]], list[dict[str, int]], list[Pending], list[Gated]]:
        """(per-layer plans, per row the first relative position of each entry found, choices left to the keys,
        finds left to their entries' question scopes) for positions >= ``first`` of ``rows``; ``selected``: only
        entries whose id is in it (``None``: all).

        A subject listed by several selected entries that all have keys at one layer is left to that layer's
        key index (``Pending``: the entry whose key is closest fires); otherwise every such entry fires, or, when
        it has a question scope, is judged by it in the forward (``Gated``).
        """
        per_layer: dict[int, list[LayerPlan]] = {}
        lexical: list[dict[str, int]] = [{} for _ in rows]
        pending: list[Pending] = []
        gated: list[Gated] = []
        trace = tracing_active()
        for row, reader in enumerate(rows):
            planned: set[tuple[int, tuple[str, ...]]] = set()  # an entry found twice at one token fires once
            for hit in reader.hits(self.matcher, first):
                owners = self.inflected if hit.inflected else self.entries_of
                position = hit.position - first
                ids = tuple(i for i in owners.get(hit.subject, ()) if (selected is None or i in selected)
                            and (position, (i,)) not in planned)
                if len(ids) > 1 and self._one_key_layer(ids) and not all(i in self.scopes for i in ids):
                    if (position, ids) not in planned:
                        planned.add((position, ids))
                        pending.append((row, position, ids, hit.subject))
                    for entry_id in ids:
                        lexical[row].setdefault(entry_id, position)
                    continue
                for entry_id in ids:
                    planned.add((position, (entry_id,)))
                    lexical[row].setdefault(entry_id, position)
                    if entry_id in self.scopes:
                        gated.append((row, position, entry_id, hit.subject, "lexical"))
                        continue
                    self.add_entry_plan(per_layer, entry_id, row, position)
                    if trace:
                        record(Route(row, hit.position, entry_id, "lexical"))
        return per_layer, lexical, pending, gated

    def _one_key_layer(self, ids: Sequence[str]) -> bool:
        """Whether every entry of ``ids`` has a routing key, all read at one layer."""
        return bool(self.keys) and all(i in self.keys for i in ids) and len({self.keys[i].layer for i in ids}) == 1

    def plan(self, rows: Sequence[RowReader], first: int,
             selected: Container[str] | None = None) -> dict[int, LayerPlan] | None:
        """The lexical per-layer plan for positions >= ``first`` of ``rows`` (positions relative to ``first``),
        without the finds left to question scopes (they are judged inside a forward)."""
        return _concat(self.lexical_plan(rows, first, selected)[0])


def _concat(per_layer: dict[int, list[LayerPlan]]) -> dict[int, LayerPlan] | None:
    return {layer: LayerPlan.concat(plans) for layer, plans in per_layer.items()} or None


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
        state = _Forward(plan=_concat(per_layer), readers=readers)
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
        return _Forward(plan=_concat(per_layer), packed_keys=work or None)

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
