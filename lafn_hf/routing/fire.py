"""The representation stage at inference: compare hidden states with the bank's keys inside the forward.

A ``KeyIndex`` holds one layer's keys on the model's device. ``candidates`` finds, per token, the entry whose
key is closest to the token's projected hidden state, and keeps the tokens where that cosine passes the
entry's threshold; ``choose`` picks, among entries that share a matched subject, the one whose key is
closest (relation-aware routing: the words read before the subject decide).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

import torch

from ..bank import KeySpace, RoutingKey

_CHUNK = 256  # token states compared at once (bounds the (tokens x keys) similarity block)


@dataclass(frozen=True)
class KeyIndex:
    """The keys of one layer: ``vectors[k]`` belongs to ``entry_ids[k]`` and fires above ``thresholds[k]``."""

    space: KeySpace
    entry_ids: tuple[str, ...]
    vectors: torch.Tensor  # (K, hidden) float32
    thresholds: torch.Tensor  # (K,) float32
    slot: dict[str, int]

    @classmethod
    def build(cls, space: KeySpace, keys: Sequence[tuple[str, RoutingKey]], device: torch.device,
              threshold: float | None) -> KeyIndex:
        on_device = KeySpace(space.layer, space.mean.to(device), space.scale.to(device))
        ids = tuple(entry_id for entry_id, _ in keys)
        vectors = torch.stack([key.vector for _, key in keys]).to(device)
        values = [threshold if threshold is not None else key.threshold for _, key in keys]
        return cls(on_device, ids, vectors, torch.tensor(values, dtype=torch.float32, device=device),
                   {entry_id: k for k, entry_id in enumerate(ids)})

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
            similarity = self.space.project(hidden[block[:, 0], block[:, 1]]) @ self.vectors.T  # (n, K)
            if allowed is not None:
                similarity = similarity.masked_fill(~allowed, -2.0)
            best, slot = similarity.max(dim=1)
            passed = (best > self.thresholds[slot]).nonzero().flatten()
            if passed.numel():
                rows, positions = block[passed, 0].tolist(), block[passed, 1].tolist()
                found += [(r, p, self.entry_ids[k]) for r, p, k in zip(rows, positions, slot[passed].tolist())]
        return found

    def choose(self, hidden: torch.Tensor, row: int, position: int, entry_ids: Sequence[str]) -> tuple[str, float]:
        """(the entry of ``entry_ids``, all in this index, whose key is closest to the state at (row, position),
        its cosine)."""
        state = self.space.project(hidden[row, position])
        slots = torch.tensor([self.slot[entry_id] for entry_id in entry_ids], device=self.vectors.device)
        cosines = self.vectors[slots] @ state
        best = int(cosines.argmax())
        return entry_ids[best], float(cosines[best])
