"""Aho-Corasick automata over anchor strings that grow without rebuilding (the matcher's word-form stages).

Each anchor stands for the values added with it. ``extended`` returns a copy that shares the existing
automata and adds a small one (a tier) for the new anchors; when tiers pile up, the small ones are merged
into one, so a bank that grows one entry at a time never rebuilds its big automaton.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ahocorasick_rs import AhoCorasick, MatchKind

V = TypeVar("V")
F = TypeVar("F", bound="AnchoredForms[Any]")
Named = Iterable[tuple[str, tuple[str, ...]]]  # (folded pattern, the subject names it stands for)


@dataclass(frozen=True)
class _Tier(Generic[V]):
    automaton: AhoCorasick
    anchors: tuple[str, ...]
    values: dict[str, tuple[V, ...]]


class AnchorTiers(Generic[V]):
    """(anchor, value) pairs, found by anchor in text; immutable, grown by ``extended``."""

    max_tiers = 4

    def __init__(self, pairs: Iterable[tuple[str, V]] = ()) -> None:
        self._tiers: tuple[_Tier[V], ...] = ()
        self._add(list(pairs))

    def __repr__(self) -> str:
        return f"AnchorTiers({sum(len(t.anchors) for t in self._tiers)} anchors in {len(self._tiers)} tiers)"

    def __bool__(self) -> bool:
        return bool(self._tiers)

    def values(self) -> Iterator[V]:
        """Every value, tier by tier (a value added under several anchors comes once per anchor)."""
        return (value for tier in self._tiers for values in tier.values.values() for value in values)

    def extended(self, pairs: Iterable[tuple[str, V]]) -> AnchorTiers[V]:
        """These pairs and ``pairs``; this object is unchanged."""
        new = list(pairs)
        if not new:
            return self
        grown: AnchorTiers[V] = object.__new__(type(self))
        grown._tiers = self._tiers
        if len(self._tiers) >= self.max_tiers:  # keep the first automaton, merge the small ones with the new
            new = [(a, v) for tier in self._tiers[1:] for a, values in tier.values.items() for v in values] + new
            grown._tiers = self._tiers[:1]
        grown._add(new)
        return grown

    def _add(self, pairs: list[tuple[str, V]]) -> None:
        by_anchor: dict[str, list[V]] = {}
        for anchor, value in pairs:
            by_anchor.setdefault(anchor, []).append(value)
        if by_anchor:
            anchors = tuple(by_anchor)
            automaton = AhoCorasick(list(anchors), matchkind=MatchKind.Standard)
            self._tiers = (*self._tiers, _Tier(automaton, anchors, {a: tuple(v) for a, v in by_anchor.items()}))

    def find(self, text: str) -> Iterator[tuple[int, int, tuple[V, ...]]]:
        """(start, end, values) of every anchor occurrence in ``text``, overlapping, tier by tier."""
        for tier in self._tiers:
            for index, start, end in tier.automaton.find_matches_as_indexes(text, overlapping=True):
                yield start, end, tier.values[tier.anchors[index]]


class AnchoredForms(Generic[V]):
    """Base of the word-form stages (inflection, reorder, spelling): subject patterns indexed by anchors.
    A subclass's ``_pairs`` says which (anchor, value) pairs its rule draws from (pattern, names) pairs;
    ``extended`` grows a copy, and this object is unchanged."""

    def __init__(self, named: Named = ()) -> None:
        self._anchors: AnchorTiers[V] = AnchorTiers(self._pairs(named))

    @staticmethod
    def _pairs(named: Named) -> list[tuple[str, V]]:
        raise NotImplementedError

    def __bool__(self) -> bool:
        return bool(self._anchors)

    def extended(self: F, named: Named) -> F:
        """These forms and ``named`` (pattern, subject names) pairs; this object is unchanged."""
        anchors = self._anchors.extended(self._pairs(named))
        if anchors is self._anchors:
            return self
        grown = object.__new__(type(self))
        grown._anchors = anchors
        return grown
