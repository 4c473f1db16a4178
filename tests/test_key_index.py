"""The representation stage's key index: a float16 screen over large indices finds exactly what the exhaustive
float32 comparison finds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lafn_hf.bank.entries import KeySpace, RoutingKey
from lafn_hf.routing.fire import KeyIndex

HIDDEN = 64


def _index(count: int, screen_from: int, seed: int = 0) -> KeyIndex:
    generator = torch.Generator().manual_seed(seed)
    space = KeySpace(3, torch.zeros(HIDDEN), torch.ones(HIDDEN))
    vectors = torch.nn.functional.normalize(torch.randn(count, HIDDEN, generator=generator), dim=1)
    thresholds = 0.6 + 0.3 * torch.rand(count, generator=generator)
    keys = [(f"e{k}", RoutingKey(space, vectors[k].clone(), float(thresholds[k]))) for k in range(count)]
    return KeyIndex.build(space, keys, torch.device("cpu"), None, screen_from=screen_from)


def _exhaustive(index: KeyIndex, hidden: torch.Tensor, allowed: set[str] | None) -> list[tuple[int, int, str]]:
    """The rule written out: each token's closest allowed key fires where it passes that key's threshold."""
    found = []
    for row in range(hidden.shape[0]):
        for position in range(hidden.shape[1]):
            state = index.space.project(hidden[row, position])
            cosines = [float(index.vectors[k] @ state) if allowed is None or entry_id in allowed else -2.0
                       for k, entry_id in enumerate(index.entry_ids)]
            best = max(range(len(cosines)), key=cosines.__getitem__)
            if cosines[best] > float(index.thresholds[best]):
                found.append((row, position, index.entry_ids[best]))
    return found


def _states_near_keys(index: KeyIndex, seed: int) -> torch.Tensor:
    """(2, 40, HIDDEN) states: random ones and ones at cosines around their nearest key's threshold."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(index.entry_ids), (40,), generator=generator)
    noise = torch.nn.functional.normalize(torch.randn(40, HIDDEN, generator=generator), dim=1)
    noise = noise - (noise * index.vectors[picks]).sum(1, keepdim=True) * index.vectors[picks]
    noise = torch.nn.functional.normalize(noise, dim=1)
    cosine = (index.thresholds[picks] + 0.004 * torch.randn(40, generator=generator)).clamp(-1, 1)[:, None]
    near = cosine * index.vectors[picks] + (1 - cosine**2).sqrt() * noise
    return torch.stack([near, torch.randn(40, HIDDEN, generator=generator)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_screened_index_fires_exactly_where_the_exhaustive_rule_does(seed: int, dtype: torch.dtype) -> None:
    index = _index(3000, screen_from=1000, seed=seed)
    index = dataclasses.replace(index, screen=index.vectors.to(dtype))  # either screen, whatever this CPU has
    hidden = _states_near_keys(index, seed)
    valid = torch.ones(hidden.shape[:2], dtype=torch.bool)
    found = index.candidates(hidden, valid, None)
    assert found == _exhaustive(index, hidden, None)
    assert 5 <= len(found) <= 35  # near-threshold states fall on both sides of it
    allowed = {f"e{k}" for k in range(0, 3000, 2)}
    assert index.candidates(hidden, valid, allowed) == _exhaustive(index, hidden, allowed)


def test_small_indices_compare_exhaustively() -> None:
    index = _index(50, screen_from=1000)
    assert index.screen is None
    hidden = _states_near_keys(index, 0)
    assert index.candidates(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), None) == _exhaustive(index, hidden, None)


@pytest.mark.parametrize("screen_from", [1000, 10**6])
def test_a_key_at_threshold_one_never_fires_even_on_its_own_state(screen_from: int) -> None:
    """A threshold of 1.0 says no cosine clears the key's negatives: it must not fire where rounding lifts a
    cosine of identical vectors above 1 (on the shipped toy, whose layer-0 input is the token embedding,
    every invented subject's key sits at 1.0 and fired inside other subjects with the same token)."""
    index = _index(2000, screen_from=screen_from)
    index = KeyIndex.build(index.space, [(entry_id, RoutingKey(index.space, index.vectors[k].clone(), 1.0))
                                         for k, entry_id in enumerate(index.entry_ids)],
                           torch.device("cpu"), None, screen_from=screen_from)
    hidden = index.vectors[None].clone()  # every key's own state
    valid = torch.ones(hidden.shape[:2], dtype=torch.bool)
    assert (hidden[0] @ index.vectors.T).max() > 1.0  # the rounding this guards against happens here
    assert index.candidates(hidden, valid, None) == []
    lowered = KeyIndex.build(index.space, [(entry_id, RoutingKey(index.space, index.vectors[k].clone(), 0.999))
                                           for k, entry_id in enumerate(index.entry_ids)],
                             torch.device("cpu"), None, screen_from=screen_from)
    assert len(lowered.candidates(hidden, valid, None)) == 2000
