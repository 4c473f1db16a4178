"""The banks one server holds: merged into the model's single ``EditBank``, each entry tagged with its banks.

A request that names one bank applies only that bank's entries through ``lafn_hf.runtime.inject.entries_selected``
with a live ``BankSelection``; the shared model state is never changed per request. Loading, reloading and
removing banks build the new merged bank first (every check done) and then swap it in, so a failing reload
changes nothing.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lafn_hf.bank.entries import EditBank
from lafn_hf.bank.store import load_bank
from lafn_hf.model import EditableCausalLM
from lafn_hf.routing.keys import separate_all

_BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class LoadedBank:
    """One bank as read from ``path`` when it was (re)loaded."""

    name: str
    path: Path
    bank: EditBank

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "path": str(self.path), "entries": len(self.bank),
                "subjects": sorted({s for entry in self.bank for s in entry.subjects.values()})}


def check_bank_name(name: str) -> str:
    """``ValueError`` unless ``name`` can follow ``+`` in a model name (letters, digits, ``_ . -``)."""
    if not isinstance(name, str) or not _BANK_NAME.match(name):
        raise ValueError(f"bank name must match {_BANK_NAME.pattern} (it becomes part of the model name "
                         f"'<base>+<bank>'), got {name!r}")
    return name


def parse_bank_spec(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (the name is then the directory's name) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/\\") or spec).name
    if not path:
        raise ValueError(f"--bank must look like DIR or NAME=DIR, got {spec!r}")
    return check_bank_name(name), Path(path)


class BankSelection:
    """``entry_id in selection``: the entry belongs to one of ``names`` in the bank set *now*."""

    def __init__(self, banks: BankSet, names: Iterable[str]) -> None:
        self._banks = banks
        self.names = frozenset(names)

    def __contains__(self, entry_id: object) -> bool:
        owners = self._banks.owners.get(entry_id) if isinstance(entry_id, str) else None
        return owners is not None and not owners.isdisjoint(self.names)

    def has_entries(self) -> bool:
        return any(not owners.isdisjoint(self.names) for owners in self._banks.owners.values())

    def __repr__(self) -> str:
        return f"BankSelection({sorted(self.names)})"


class BankSet:
    """Named banks on one ``EditableCausalLM``: ``load``, ``reload``, ``remove``, ``selection``."""

    def __init__(self, model: EditableCausalLM) -> None:
        self._model = model
        self._banks: dict[str, LoadedBank] = {}
        self.owners: Mapping[str, frozenset[str]] = {}  # entry id -> names of the banks holding it
        self._lock = threading.Lock()  # one change at a time

    def names(self) -> tuple[str, ...]:
        return tuple(self._banks)

    def get(self, name: str) -> LoadedBank:
        try:
            return self._banks[name]
        except KeyError:
            raise KeyError(f"no bank named {name!r}; loaded: {sorted(self._banks)}") from None

    def __iter__(self) -> Iterator[LoadedBank]:
        return iter(list(self._banks.values()))

    def __len__(self) -> int:
        return len(self._banks)

    def selection(self, names: Iterable[str]) -> BankSelection:
        return BankSelection(self, names)

    def load(self, name: str, path: str | os.PathLike[str]) -> LoadedBank:
        """Read the bank at ``path`` under ``name`` (replacing a bank of that name); returns it."""
        loaded = self._read(check_bank_name(name), Path(path))
        with self._lock:
            self._install({**self._banks, name: loaded})
        return loaded

    def load_many(self, specs: Sequence[tuple[str, Path]]) -> None:
        names = [name for name, _ in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"two --bank options have the name(s) {duplicates}; name them with NAME=DIR")
        loaded = {name: self._read(check_bank_name(name), Path(path)) for name, path in specs}
        with self._lock:
            self._install({**self._banks, **loaded})

    def reload(self, names: Iterable[str] | None = None) -> list[LoadedBank]:
        """Read ``names`` (default: every bank) again from their directories; all or nothing. The banks are
        read outside the lock (loading and removing banks meanwhile do not wait); a bank removed or replaced
        meanwhile keeps what that change left."""
        chosen = {loaded.name: loaded for loaded in (list(self) if names is None else map(self.get, names))}
        fresh = {name: self._read(name, loaded.path) for name, loaded in chosen.items()}
        with self._lock:
            still = {name: bank for name, bank in fresh.items() if self._banks.get(name) is chosen[name]}
            self._install({**self._banks, **still})
            return list(still.values())

    def remove(self, name: str) -> LoadedBank:
        with self._lock:
            removed = self.get(name)
            self._install({n: b for n, b in self._banks.items() if n != name})
        return removed

    def _read(self, name: str, path: Path) -> LoadedBank:
        if not path.is_dir():
            raise ValueError(f"bank {name!r}: {path} is not a directory")
        bank, ref = load_bank(path)
        ref.check_compatible(self._model.base_ref)
        return LoadedBank(name, path, bank)

    def _install(self, banks: dict[str, LoadedBank]) -> None:
        """Merge ``banks`` into a new model bank and swap it in (nothing changes if merging fails)."""
        merged = EditBank()
        owners: dict[str, set[str]] = {}
        for loaded in banks.values():
            try:
                merged = merged.merge(loaded.bank)
            except ValueError as error:
                raise ValueError(f"bank {loaded.name!r} ({loaded.path}): {error}") from None
            for entry in loaded.bank:
                owners.setdefault(entry.id, set()).add(loaded.name)
        if len(banks) > 1:  # keys of different banks were calibrated apart: against each other too
            separate_all(merged, self._model.routing.threshold_margin)
        new_owners = {entry_id: frozenset(names) for entry_id, names in owners.items()}
        # While the model switches banks, a forward may see either version: owners cover both meanwhile.
        old = self.owners
        self.owners = {**old, **{k: v | old.get(k, frozenset()) for k, v in new_owners.items()}}
        try:
            self._model.set_bank(merged)  # checks every entry against the model first
        except BaseException:
            self.owners = old
            raise
        self.owners = new_owners
        self._banks = banks
