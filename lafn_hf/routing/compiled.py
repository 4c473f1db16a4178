"""A bank compiled for routing: one immutable snapshot per bank version and ``RoutingConfig`` (matcher, surface
form -> entry ids, dV on the device, routing keys and question scopes), and the lexical plan it makes for the
rows a forward reads: which entries fire at which token, and which finds are left to the keys or to the
entries' question scopes (``fire``). The runtime's hooks (``lafn_hf.runtime.inject``) add what it plans.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..bank.entries import BankEntry, EditBank, KeySpace, QuestionScope, RoutingKey, ScopeSpace
from ..values import LayerPlan
from .config import RoutingConfig
from .fire import Gated, KeyIndex, Pending
from .matcher import SubjectMatcher
from .row_reader import RowReader
from .scope import ScopeIndex
from .trace import Route, record, tracing_active


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
    _scope_spaces: dict[int, ScopeSpace] = field(default_factory=dict, compare=False, repr=False)

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
            space = self._scope_spaces.get(id(scope.space))
            if space is None:  # once per space: entries made together share it
                space = self._scope_spaces[id(scope.space)] = scope.space.to(self.version[2])
            index = self._scope_indices[entry_id] = ScopeIndex(scope, space, self.routing.scope_margin_override)
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
        return replace(compiled, matcher=matcher, _indices={}, _scope_indices={}, _scope_spaces={})

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
        return concat_plans(self.lexical_plan(rows, first, selected)[0])


def concat_plans(per_layer: dict[int, list[LayerPlan]]) -> dict[int, LayerPlan] | None:
    return {layer: LayerPlan.concat(plans) for layer, plans in per_layer.items()} or None
