"""The edit bank: {subjects S_G: dV_{D_G}} for every edit (paper section 2.3, Eq. 10).

An entry stores, per edited layer, the located neuron indices D_G (int64) and the update
dV (float32). Model weights are never touched; the bank is applied at inference by
``lafn_hf.runtime.inject``.

Overlapping subjects: every entry is kept, even when two entries share a subject. At
inference, when a subject matches, the dV of *every* entry listing that subject is added
(updates sum). Different subjects that overlap in the text both apply, each at the token that
completes it ("Paris" at "Paris", "Paris Hilton" at "Hilton"; see ``lafn_hf.routing.matcher``).
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..text import check_aliases, check_form_length, nfc
from .spaces import KeySpace, QuestionScope, RoutingKey, ScopeSpace, _describe

__all__ = ["BankEntry", "BankLimits", "EditBank", "KeySpace", "LayerUpdate", "QuestionScope", "RoutingKey", "ScopeSpace"]

_BANK_UIDS = itertools.count()
_CHANGE_LOG = 4096  # bank changes kept for incremental updates of compiled banks
_ENTRY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True)
class LayerUpdate:
    """dV for one layer: ``delta[k]`` is added to the value of neuron ``neurons[k]``."""

    neurons: torch.Tensor  # (n,) int64, unique, sorted
    delta: torch.Tensor  # (n,) float32

    def __post_init__(self) -> None:
        if not isinstance(self.neurons, torch.Tensor) or self.neurons.dtype != torch.int64 or self.neurons.dim() != 1:
            raise TypeError(f"neurons must be a 1-D int64 tensor, got {_describe(self.neurons)}")
        if not isinstance(self.delta, torch.Tensor) or self.delta.dtype != torch.float32 or self.delta.dim() != 1:
            raise TypeError(f"delta must be a 1-D float32 tensor, got {_describe(self.delta)}")
        if self.neurons.shape != self.delta.shape:
            raise ValueError(f"neurons {tuple(self.neurons.shape)} and delta {tuple(self.delta.shape)} differ in shape")
        if self.neurons.numel() and (int(self.neurons.min()) < 0 or not _distinct(self.neurons)):
            raise ValueError("neuron indices must be unique and >= 0")
        if not bool(torch.isfinite(self.delta).all()):
            raise ValueError("delta contains NaN or inf")

    @classmethod
    def _from_checked(cls, neurons: torch.Tensor, delta: torch.Tensor) -> LayerUpdate:
        """Skip ``__post_init__``: only for tensors whose checks were already done in bulk (``bank_format``)."""
        update = object.__new__(cls)
        update.__dict__.update(neurons=neurons, delta=delta)
        return update

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only this update's values: a loaded bank's tensors are views of one tensor per bank, which
        pickling a view would write out whole."""
        return {"neurons": _compact(self.neurons), "delta": _compact(self.delta)}


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it when it is a view of a larger storage."""
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size() else tensor


def _distinct(neurons: torch.Tensor) -> bool:
    """No index twice; O(n) for the usual sorted case."""
    return bool((neurons[1:] > neurons[:-1]).all()) or neurons.unique().numel() == neurons.numel()


@dataclass(frozen=True)
class BankEntry:
    """One edit: aligned subjects per language, the per-layer updates and free-form metadata.

    ``metadata`` holds what produced the edit (prompts, targets, config, result summary);
    it is saved as JSON and must be JSON-serialisable. ``aliases`` are further surface forms that route to
    the entry (any language); ``key`` its representation key (``None``: lexical routing only); ``scope`` the
    questions it answers (``None``: every question that names its subject, as banks made before scopes).
    """

    subjects: dict[str, str]
    updates: dict[int, LayerUpdate]
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"edit-{uuid.uuid4().hex[:12]}")
    aliases: tuple[str, ...] = ()
    key: RoutingKey | None = None
    scope: QuestionScope | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ENTRY_ID.match(self.id):
            raise ValueError(f"entry id must match {_ENTRY_ID.pattern}, got {self.id!r}")
        if not isinstance(self.subjects, dict) or not self.subjects:
            raise ValueError(f"entry {self.id!r} needs at least one subject, got {self.subjects!r}")
        for lang, subject in self.subjects.items():
            if not isinstance(subject, str) or not subject.strip():
                raise ValueError(f"entry {self.id!r}: subject for {lang!r} must be a non-empty str, got {subject!r}")
            check_form_length(subject, f"entry {self.id!r}: subject for {lang!r}")
        object.__setattr__(self, "subjects", {lang: nfc(s) for lang, s in self.subjects.items()})
        object.__setattr__(self, "aliases", check_aliases(self.aliases, f"entry {self.id!r}"))
        if self.key is not None and not isinstance(self.key, RoutingKey):
            raise TypeError(f"entry {self.id!r}: key must be a RoutingKey or None, got {type(self.key).__name__}")
        if self.key is not None and self.updates and self.key.layer > min(self.updates):
            raise ValueError(f"entry {self.id!r}: its routing key (layer {self.key.layer}) must be read at or below its "
                             f"first edited layer {min(self.updates)}")
        if self.scope is not None and not isinstance(self.scope, QuestionScope):
            raise TypeError(f"entry {self.id!r}: scope must be a QuestionScope or None, got {type(self.scope).__name__}")
        if self.scope is not None and self.updates and self.scope.layer > min(self.updates):
            raise ValueError(f"entry {self.id!r}: its question scope (layer {self.scope.layer}) must be read at or "
                             f"below its first edited layer {min(self.updates)}")
        if not isinstance(self.updates, dict) or not self.updates:
            raise ValueError(f"entry {self.id!r} needs at least one layer update")
        for layer, update in self.updates.items():
            if not isinstance(layer, int) or layer < 0:
                raise ValueError(f"entry {self.id!r}: layer index must be an int >= 0, got {layer!r}")
            if not isinstance(update, LayerUpdate):
                raise TypeError(f"entry {self.id!r}: updates[{layer}] must be a LayerUpdate")

    @classmethod
    def _from_checked(cls, subjects: dict[str, str], updates: dict[int, LayerUpdate], metadata: dict[str, Any],
                      entry_id: str, aliases: tuple[str, ...] = (), key: RoutingKey | None = None,
                      scope: QuestionScope | None = None) -> BankEntry:
        """Skip ``__post_init__``: only for fields already checked (and subjects NFC-normalised) in bulk."""
        entry = object.__new__(cls)
        entry.__dict__.update(subjects=subjects, updates=updates, metadata=metadata, id=entry_id, aliases=aliases,
                              key=key, scope=scope)
        return entry

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.updates))

    @property
    def surface_forms(self) -> tuple[str, ...]:
        """Every string that routes to this entry lexically: its subjects, then its aliases."""
        return tuple(dict.fromkeys([*self.subjects.values(), *self.aliases]))

    def __repr__(self) -> str:
        neurons = {layer: int(self.updates[layer].neurons.numel()) for layer in self.layers}
        extra = f", aliases={list(self.aliases)!r}" if self.aliases else ""
        extra += f", key@{self.key.layer}>{self.key.threshold:.3f}" if self.key is not None else ""
        extra += f", scope@{self.scope.layer}{self.scope.margin:+.2f}" if self.scope is not None else ""
        return (f"BankEntry(id={self.id!r}, subjects={self.subjects!r}, layers={list(self.layers)}, "
                f"neurons={neurons!r}{extra})")


@dataclass(frozen=True)
class BankLimits:
    """The model sizes an entry must fit: layers < ``num_hidden_layers``, neurons < ``intermediate_size``,
    routing keys and question scopes ``hidden_size`` wide (``None``: not checked)."""

    num_hidden_layers: int
    intermediate_size: int
    hidden_size: int | None = None

    def check(self, entry: BankEntry) -> None:
        """``ValueError`` naming the entry, the layer and the limit it exceeds."""
        widths = {"routing key": entry.key.vector.numel() if entry.key is not None else None,
                  "question scope": entry.scope.vectors.shape[1] if entry.scope is not None else None}
        for what, width in widths.items():
            if self.hidden_size is not None and width is not None and width != self.hidden_size:
                raise ValueError(f"entry {entry.id!r}: its {what} has size {width}, the model's hidden_size is "
                                 f"{self.hidden_size}")
        for layer, update in sorted(entry.updates.items()):
            if layer >= self.num_hidden_layers:
                raise ValueError(f"entry {entry.id!r}: layer {layer} is out of range for a model with "
                                 f"num_hidden_layers {self.num_hidden_layers}")
            top = int(update.neurons.max()) if update.neurons.numel() else -1
            if top >= self.intermediate_size:
                raise ValueError(f"entry {entry.id!r}: layer {layer}: neuron index {top} is out of range for "
                                 f"intermediate_size {self.intermediate_size}")


class EditBank:
    """An ordered collection of ``BankEntry`` with add / get / remove / merge.

    ``version`` increases on every change so that matchers and device caches rebuild lazily.
    ``limits`` (set by the model wrapper the bank is attached to) makes ``add`` refuse entries that do
    not fit the model. Changes are serialised by a lock, and ``snapshot`` reads the version and the entries
    together, so threads may edit while others generate.
    """

    def __init__(self, entries: list[BankEntry] | None = None, limits: BankLimits | None = None) -> None:
        self._entries: dict[str, BankEntry] = {}
        self._lock = threading.RLock()
        self.uid = next(_BANK_UIDS)  # never reused (unlike id()), so compiled views of a freed bank never match
        self._changes: deque[tuple[int, str, BankEntry]] = deque(maxlen=_CHANGE_LOG)  # (version, op, entry)
        self.version = 0
        self.limits = limits
        for entry in entries or []:
            self.add(entry)

    @classmethod
    def _from_checked(cls, entries: list[BankEntry]) -> EditBank:
        """A bank of ``entries`` (distinct ids, already checked) without per-entry ``add``; no ``limits``."""
        bank = cls()
        bank._entries = {entry.id: entry for entry in entries}
        bank.version = len(entries)  # as if added one by one
        return bank

    def add(self, entry: BankEntry) -> str:
        """Add an entry; returns its id. A second entry with the same id, or one outside ``limits``, is a
        ``ValueError`` and leaves the bank unchanged."""
        if not isinstance(entry, BankEntry):
            raise TypeError(f"expected a BankEntry, got {type(entry).__name__}")
        if self.limits is not None:
            self.limits.check(entry)
        with self._lock:
            if entry.id in self._entries:
                raise ValueError(f"entry id {entry.id!r} is already in the bank")
            self._entries[entry.id] = entry
            self.version += 1
            self._changes.append((self.version, "add", entry))
        return entry.id

    def replace(self, entry: BankEntry) -> BankEntry:
        """Swap the entry with ``entry.id`` for ``entry`` (same place in the order); returns the old one."""
        if not isinstance(entry, BankEntry):
            raise TypeError(f"expected a BankEntry, got {type(entry).__name__}")
        if self.limits is not None:
            self.limits.check(entry)
        with self._lock:
            old = self.get(entry.id)
            self._entries[entry.id] = entry
            self.version += 1
            self._changes.append((self.version, "remove", old))
            self._changes.append((self.version, "add", entry))
        return old

    def get(self, entry_id: str) -> BankEntry:
        try:
            return self._entries[entry_id]
        except KeyError:
            raise ValueError(f"no entry {entry_id!r} in the bank; known ids: {list(self._entries)[:10]}") from None

    def remove(self, entry_id: str) -> BankEntry:
        """Roll back one edit; returns the removed entry."""
        with self._lock:
            entry = self.get(entry_id)
            del self._entries[entry_id]
            self.version += 1
            self._changes.append((self.version, "remove", entry))
        return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.version += 1
            self._changes.clear()  # too many to replay: readers of older versions rebuild

    def changes_since(self, version: int) -> tuple[int, list[tuple[str, BankEntry]]] | None:
        """(current version, the ("add" | "remove", entry) changes after ``version``), or ``None`` when they are
        no longer all known (more than the last few thousand, or a ``clear``): rebuild from ``snapshot``."""
        with self._lock:
            if version == self.version:
                return self.version, []
            if not self._changes or self._changes[0][0] > version + 1 or version > self.version:
                return None
            return self.version, [(op, entry) for number, op, entry in self._changes if number > version]

    def snapshot(self) -> tuple[int, list[BankEntry]]:
        """(version, entries) read together."""
        with self._lock:
            return self.version, list(self._entries.values())

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self.uid = next(_BANK_UIDS)

    def merge(self, other: EditBank) -> EditBank:
        """A new bank (same ``limits``) with this bank's entries then ``other``'s; a shared id must hold the
        same entry."""
        merged = EditBank(list(self), limits=self.limits)
        for entry in other:
            if entry.id in merged and not _same_entry(merged.get(entry.id), entry):
                raise ValueError(f"cannot merge: entry id {entry.id!r} exists in both banks with different content")
            if entry.id not in merged:
                merged.add(entry)
        return merged

    def subject_index(self) -> dict[str, tuple[str, ...]]:
        """Every subject (any language) -> ids of the entries that list it, in insertion order."""
        index: dict[str, list[str]] = {}
        for entry in self._entries.values():
            for subject in dict.fromkeys(entry.subjects.values()):
                index.setdefault(subject, []).append(entry.id)
        return {subject: tuple(ids) for subject, ids in index.items()}

    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for entry in self._entries.values() for layer in entry.updates}))

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __iter__(self) -> Iterator[BankEntry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        shown = [f"{entry.id} {entry.subjects!r}" for entry in list(self._entries.values())[:3]]
        if len(self) > 3:
            shown.append(f"... {len(self) - 3} more")
        count = f"{len(self)} {'entry' if len(self) == 1 else 'entries'}"
        return f"EditBank({count}, layers={list(self.layers())}" + (": " + ", ".join(shown) if shown else "") + ")"


def _same_entry(a: BankEntry, b: BankEntry) -> bool:
    if a.subjects != b.subjects or a.updates.keys() != b.updates.keys() or a.aliases != b.aliases:
        return False
    if (a.key is None) != (b.key is None):
        return False
    if a.key is not None and b.key is not None and not (
            a.key.space.same_as(b.key.space) and a.key.threshold == b.key.threshold
            and torch.equal(a.key.vector, b.key.vector)):
        return False
    if (a.scope is None) != (b.scope is None):
        return False
    if a.scope is not None and b.scope is not None and not (
            a.scope.space.same_as(b.scope.space) and (a.scope.relation, a.scope.margin) == (b.scope.relation, b.scope.margin)
            and torch.equal(a.scope.vectors, b.scope.vectors)):
        return False
    return all(
        torch.equal(a.updates[k].neurons, b.updates[k].neurons) and torch.equal(a.updates[k].delta, b.updates[k].delta)
        for k in a.updates
    )
