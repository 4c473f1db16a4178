"""The representation stage at inference: compare hidden states with the bank's keys inside the forward.

A ``KeyIndex`` holds one layer's keys on the model's device. ``candidates`` finds, per token, the entry whose
key is closest to the token's projected hidden state, and keeps the tokens where that cosine passes the
entry's threshold; ``choose`` picks, among entries that share a matched subject, the one whose key is
closest (relation-aware routing: the words read before the subject decide). ``KeyWork`` does both in the
forward, then lets each entry with a question scope (``lafn_hf.routing.scope``) fire only where its scope
admits the sentence around the token.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..bank.entries import KeySpace, QuestionScope, RoutingKey
from .scope import ScopeIndex, sentence_window, visible_last
from .trace import Route, record, tracing_active

_CHUNK = 256  # token states compared at once (bounds the (tokens x keys) similarity block)
SCREEN_FROM = 4096  # keys from which an index screens in half precision before the exact float32 check
# bounds on |half - float32| cosine of unit vectors: 2.5x the input rounding (2 * 2^-11, 2 * 2^-8) with
# float32 accumulation; measured at most 5e-4 (float16) and 2.2e-3 (bfloat16) at hidden size 640
_SCREEN_ERROR = {torch.float16: 0.005, torch.bfloat16: 0.02}
# (row, relative position, entries sharing the matched subject, that subject)
Pending = tuple[int, int, tuple[str, ...], str]
# (row, relative position, entry, the subject found ("": a key's find at one token's state), stage) of a find left
# to the entry's question scope
Gated = tuple[int, int, str, str, str]


@dataclass(frozen=True)
class KeyIndex:
    """The keys of one layer: ``vectors[k]`` belongs to ``entry_ids[k]`` and fires above ``thresholds[k]``."""

    space: KeySpace
    entry_ids: tuple[str, ...]
    vectors: torch.Tensor  # (K, hidden) float32
    thresholds: torch.Tensor  # (K,) float32; inf for a threshold of 1.0, which no cosine passes: rounding can
    # lift the cosine of identical unit vectors above 1 (measured: the toy's context-free keys fired inside
    # other subjects' names)
    slot: dict[str, int]
    screen: torch.Tensor | None = None  # (K, hidden) half-precision copy of ``vectors`` for large indices

    @classmethod
    def build(cls, space: KeySpace, keys: Sequence[tuple[str, RoutingKey]], device: torch.device,
              threshold: float | None, screen_from: int = SCREEN_FROM) -> KeyIndex:
        on_device = KeySpace(space.layer, space.mean.to(device), space.scale.to(device))
        ids = tuple(entry_id for entry_id, _ in keys)
        vectors = torch.stack([key.vector for _, key in keys]).to(device)
        values = [threshold if threshold is not None else key.threshold for _, key in keys]
        values = [math.inf if value >= 1.0 else value for value in values]  # see ``thresholds``
        half = _screen_dtype(device) if len(ids) >= screen_from else None
        screen = vectors.to(half) if half is not None else None
        return cls(on_device, ids, vectors, torch.tensor(values, dtype=torch.float32, device=device),
                   {entry_id: k for k, entry_id in enumerate(ids)}, screen)

    def candidates(self, hidden: torch.Tensor, valid: torch.Tensor,
                   selected: Container[str] | None) -> list[tuple[int, int, str]]:
        """(row, position, entry id) of every valid token whose closest key passes its threshold, in order."""
        where = valid.nonzero()
        if not where.numel():
            return []
        allowed = None
        if selected is not None:
            allowed = torch.tensor([entry_id in selected for entry_id in self.entry_ids], device=self.vectors.device)
            if not bool(allowed.any()):
                return []
        found: list[tuple[int, int, str]] = []
        for start in range(0, where.shape[0], _CHUNK):
            block = where[start : start + _CHUNK]
            states = self.space.project(hidden[block[:, 0], block[:, 1]])  # (n, hidden) unit vectors
            best, slot = self._closest(states, allowed)
            passed = (best > self.thresholds[slot]).nonzero().flatten()
            if passed.numel():
                rows, positions = block[passed, 0].tolist(), block[passed, 1].tolist()
                found += [(r, p, self.entry_ids[k]) for r, p, k in zip(rows, positions, slot[passed].tolist())]
        return found

    def _closest(self, states: torch.Tensor, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine, slot) of each state's closest allowed key, in float32.

        With a half-precision screen, the exact cosines are computed only for the keys within twice the screen's error
        of a state's screened best (the true best is among them), and only for states where one of those could
        pass its threshold; other states report the screened best, which cannot pass.
        """
        if self.screen is None:
            similarity = states @ self.vectors.T  # (n, K)
            if allowed is not None:
                similarity = similarity.masked_fill(~allowed, -2.0)
            return similarity.max(dim=1)
        error = _SCREEN_ERROR[self.screen.dtype]
        approx = (states.to(self.screen.dtype) @ self.screen.T).float()
        if allowed is not None:
            approx = approx.masked_fill(~allowed, -2.0)
        best, slot = approx.max(dim=1)
        contenders = approx >= (best - 2 * error)[:, None]
        hopeful = (contenders & (approx > self.thresholds - error)).any(dim=1).nonzero().flatten()
        for row in hopeful.tolist():
            slots = contenders[row].nonzero().flatten()
            exact = self.vectors[slots] @ states[row]
            top = int(exact.argmax())
            best[row], slot[row] = exact[top], slots[top]
        return best, slot

    def choose(self, hidden: torch.Tensor, row: int, position: int, entry_ids: Sequence[str]) -> tuple[str, float]:
        """(the entry of ``entry_ids``, all in this index, whose key is closest to the state at (row, position),
        its cosine)."""
        state = self.space.project(hidden[row, position])
        slots = torch.tensor([self.slot[entry_id] for entry_id in entry_ids], device=self.vectors.device)
        cosines = self.vectors[slots] @ state
        best = int(cosines.argmax())
        return entry_ids[best], float(cosines[best])


def _screen_dtype(device: torch.device) -> torch.dtype | None:
    """The half precision whose matrix products beat float32 there: float16 on GPUs, bfloat16 on CPUs whose
    oneDNN has bfloat16 kernels (4-7x faster than float32 at 10k keys on an AVX-512 CPU); None elsewhere."""
    if device.type == "cuda":
        return torch.float16
    if device.type != "cpu":
        return None
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


class RoutedBank(Protocol):
    """What ``KeyWork`` needs of a compiled bank (``lafn_hf.routing.compiled.CompiledBank``)."""

    @property
    def keys(self) -> dict[str, RoutingKey]: ...

    @property
    def scopes(self) -> dict[str, QuestionScope]: ...

    def key_indices(self, layer: int) -> list[KeyIndex]: ...

    def scope_index(self, entry_id: str) -> ScopeIndex: ...

    def add_entry_plan(self, per_layer: dict[int, list[Any]], entry_id: str, row: int, position: int) -> None: ...


def choose_among(indices: Sequence[KeyIndex], hidden: torch.Tensor, row: int, position: int,
                 ids: Sequence[str]) -> str:
    """Among ``ids`` (entries sharing a matched subject), the one whose key is closest to that token's state."""
    best: tuple[float, str] | None = None
    for index in indices:
        mine = [entry_id for entry_id in ids if entry_id in index.slot]
        if mine:
            chosen, cosine = index.choose(hidden, row, position, mine)
            if best is None or cosine > best[0]:
                best = (cosine, chosen)
    return best[1] if best is not None else ids[-1]


@dataclass
class KeyWork:
    """What the key hooks of one forward need: the compiled bank, the rows' readers, which new tokens count,
    what the lexical stage fired, and the choices it left to the keys."""

    compiled: RoutedBank
    readers: Sequence[Any]  # RowReader: ``fired`` is read and updated
    first: int
    valid: torch.Tensor  # (B, new) bool: real, non-special tokens
    lexical: list[dict[str, int]]
    pending: list[Pending]
    selected: Container[str] | None
    gated: list[Gated] = field(default_factory=list)
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # scope layer -> its input in this forward

    def route(self, layer: int, hidden: torch.Tensor) -> dict[int, list[Any]]:
        """Plans for the pending choices and the representation hits of the keys at ``layer``, then for the
        finds whose question scope is read at ``layer`` (or below it, when a key found them only now). Each
        row's reader then records what fired (a find its scope turned down does not count)."""
        per_layer: dict[int, list[Any]] = {}
        self.states[layer] = hidden
        fired = self._route_keys(layer, hidden, per_layer)
        admitted = self._judge_scopes(layer, per_layer)
        scoped = self.compiled.scopes
        for row, reader in enumerate(self.readers):
            reader.fired = (set(reader.fired) | fired[row] | admitted[row]
                            | {entry_id for entry_id in self.lexical[row] if entry_id not in scoped})
        return per_layer

    def _fire(self, per_layer: dict[int, list[Any]], entry_id: str, row: int, position: int, subject: str,
              stage: str) -> bool:
        """Plan ``entry_id`` there now, or leave it to its scope (``False``)."""
        if entry_id in self.compiled.scopes:
            self.gated.append((row, position, entry_id, subject, stage))
            return False
        self.compiled.add_entry_plan(per_layer, entry_id, row, position)
        if tracing_active():
            record(Route(row, self.first + position, entry_id, stage))
        return True

    def _judge_scopes(self, layer: int, per_layer: dict[int, list[Any]]) -> list[set[str]]:
        """Fire each gated find whose scope admits the sentence around it (see ``lafn_hf.routing.scope``), judged
        on the states entering its scope's layer; of several entries of one subject admitted at one token (facts
        of one subject), the one with the widest margin. Returns per row the entries fired."""
        waiting: list[Gated] = []
        best: dict[tuple[int, int, str], tuple[float, str, str]] = {}
        last = self.first + self.valid.shape[1] - 1
        for row, position, entry_id, subject, stage in self.gated:
            hidden = self.states.get(self.compiled.scopes[entry_id].layer)
            if hidden is None:  # its layer comes later in this forward
                waiting.append((row, position, entry_id, subject, stage))
                continue
            reader = self.readers[row]
            at = self.first + position
            window = sentence_window(reader, at, len(subject), self.first, visible_last(reader, at, last))
            if not window:
                continue
            index = self.compiled.scope_index(entry_id)
            pooled = hidden[row, [p - self.first for p in window]].float().mean(dim=0, keepdim=True)
            excess = float(index.margins(pooled)[0]) - index.margin
            contest = (row, position, subject or entry_id)  # only entries found as one subject compete
            if excess >= 0 and excess > best.get(contest, (-1.0, "", ""))[0]:
                best[contest] = (excess, entry_id, stage)
        self.gated = waiting
        admitted: list[set[str]] = [set() for _ in self.readers]
        trace = tracing_active()
        for (row, position, _), (_, entry_id, stage) in sorted(best.items()):
            self.compiled.add_entry_plan(per_layer, entry_id, row, position)
            admitted[row].add(entry_id)
            if trace:
                record(Route(row, self.first + position, entry_id, stage))
        return admitted

    def _route_keys(self, layer: int, hidden: torch.Tensor, per_layer: dict[int, list[Any]]) -> list[set[str]]:
        """Plans of the key stage at ``layer`` (finds of entries with scopes are left to them); per row the
        entries it fired."""
        fired: list[set[str]] = [set() for _ in self.readers]
        indices = self.compiled.key_indices(layer)
        if not indices:
            return fired
        for row, position, ids, subject in self.pending:
            if self.compiled.keys[ids[0]].layer == layer:
                chosen = choose_among(indices, hidden, row, position, ids)
                if self._fire(per_layer, chosen, row, position, subject, "relation"):
                    fired[row].add(chosen)
        found = sorted(hit for index in indices for hit in index.candidates(hidden, self.valid, self.selected))
        seen: list[set[str]] = [set(reader.fired) for reader in self.readers]
        for row, position, entry_id in found:
            first_lexical = self.lexical[row].get(entry_id)
            if entry_id in seen[row] or (first_lexical is not None and first_lexical <= position):
                continue
            seen[row].add(entry_id)
            if self._fire(per_layer, entry_id, row, position, "", "representation"):
                fired[row].add(entry_id)
        return fired
