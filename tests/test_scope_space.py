"""The scope space: where question scopes compare sentences (``lafn_hf.routing.scope.scope_space``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lafn_hf.bank.entries import KeySpace, QuestionScope, ScopeSpace
from lafn_hf.bank.format import decode, encode
from lafn_hf.bank.store import load_bank, save_bank
from lafn_hf.routing import RoutingConfig
from lafn_hf.routing.scope import ScopeIndex, discriminant_basis, nearest_relation, scope_space

from .conftest import SMALL_BASE
from .crafting import routed_bank

WIDTH, RELATIONS, LANGUAGES, SUBJECTS = 16, 6, 3, 3


def sentence_states(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic pooled states in which the language moves a sentence far more than the relation it asks,
    along directions no single dimension isolates: (relation signals, language offsets, subject offsets)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator)).Q  # rotate away from the axes
    relation = torch.randn(RELATIONS, WIDTH, generator=generator) @ mixing
    language = 6.0 * torch.randn(LANGUAGES, WIDTH, generator=generator) @ mixing
    subject = 0.5 * torch.randn(SUBJECTS + 2, WIDTH, generator=generator) @ mixing
    return relation, language, subject


def templates(relation: torch.Tensor, language: torch.Tensor, subject: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R x L templates, S stand-ins, width) states and each template's relation, as ``calibrate_scope_space``
    reads the built-in prompts."""
    states = torch.stack([torch.stack([relation[r] + language[lang] + subject[s] for s in range(SUBJECTS)])
                          for lang in range(LANGUAGES) for r in range(RELATIONS)])
    return states, torch.arange(RELATIONS).repeat(LANGUAGES)


def judged(discriminant: bool) -> tuple[float, float]:
    """(margin of the entry's relation asked in another language, margin of another relation asked in the
    entry's own language), for an entry on a new subject asking relation 0 in language 0."""
    relation, language, subject = sentence_states()
    space = scope_space(3, *templates(relation, language, subject), discriminant=discriminant)
    entity = subject[SUBJECTS]  # not a stand-in
    own = space.project((relation[0] + language[0] + entity).unsqueeze(0))
    index = ScopeIndex(QuestionScope(space, own, nearest_relation(space, own), 0.0), space, None)
    rephrased = relation[0] + language[2] + entity
    other_relation = relation[1] + language[0] + entity
    return float(index.margins(rephrased.unsqueeze(0))[0]), float(index.margins(other_relation.unsqueeze(0))[0])


def test_the_scope_reads_the_relation_asked_not_the_language_it_is_asked_in() -> None:
    rephrased, other_relation = judged(discriminant=True)
    assert rephrased > 0.5 and other_relation < -0.5
    rephrased, other_relation = judged(discriminant=False)  # scaled only, as banks made before
    assert rephrased - other_relation < 0.2 and other_relation > RoutingConfig().scope_margin  # the other leaks


def test_the_discriminant_basis_keeps_one_direction_per_relation_but_one() -> None:
    relation, language, subject = sentence_states()
    states, relations = templates(relation, language, subject)
    basis = discriminant_basis(states.flatten(0, 1), relations.repeat_interleave(SUBJECTS))
    assert basis.shape == (RELATIONS - 1, WIDTH) and basis.dtype == torch.float32
    assert torch.isfinite(basis).all()


def test_class_labels_may_have_gaps_and_bad_input_is_refused() -> None:
    relation, language, subject = sentence_states()
    states, relations = templates(relation, language, subject)
    flat, labels = states.flatten(0, 1), relations.repeat_interleave(SUBJECTS)
    gapped = discriminant_basis(flat, labels * 7 + 3)  # ids 3, 10, 17, ...: the same classes
    assert gapped.shape == (RELATIONS - 1, WIDTH)
    assert torch.allclose(gapped.abs(), discriminant_basis(flat, labels).abs(), atol=1e-4)
    with pytest.raises(TypeError, match="classes must be a"):
        discriminant_basis(flat, labels.float())
    with pytest.raises(TypeError, match="vectors must be a 2-D"):
        discriminant_basis(flat[0], labels)
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        discriminant_basis(flat, torch.zeros_like(labels))


def test_a_space_projects_through_its_basis_and_keeps_its_width() -> None:
    relation, language, subject = sentence_states()
    space = scope_space(0, *templates(relation, language, subject))
    assert space.basis is not None and space.basis.shape == (RELATIONS - 1, WIDTH)
    projected = space.project(torch.randn(4, WIDTH))
    assert projected.shape == (4, WIDTH) and torch.allclose(projected.norm(dim=1), torch.ones(4))
    assert not projected[:, RELATIONS - 1:].any()  # k coordinates used, the rest zero
    assert "basis=5" in repr(space)


def test_a_space_without_a_basis_projects_as_banks_made_before() -> None:
    relation, language, subject = sentence_states()
    plain = scope_space(0, *templates(relation, language, subject), discriminant=False)
    hidden = torch.randn(4, WIDTH)
    assert plain.basis is None
    assert torch.equal(plain.project(hidden), KeySpace(0, plain.mean, plain.scale).project(hidden))


def test_one_relation_has_no_basis() -> None:
    relation, language, subject = sentence_states()
    states, relations = templates(relation, language, subject)
    assert scope_space(0, states, torch.zeros_like(relations)).basis is None


@pytest.mark.parametrize("rows", [0, WIDTH + 1])
def test_a_basis_of_the_wrong_shape_is_refused(rows: int) -> None:
    space = scope_space(0, *templates(*sentence_states()))
    with pytest.raises(TypeError, match=rf"scope space basis must be a \(k, {WIDTH}\) float32 tensor"):
        ScopeSpace(0, space.mean, space.scale, space.templates, space.relations, torch.ones(rows, WIDTH))


def test_bases_are_saved_and_loaded_and_a_space_without_one_stays_without(tmp_path: Path) -> None:
    bank = routed_bank(32)  # e0's scope space has a basis, e1's has none
    save_bank(tmp_path / "bank", bank, SMALL_BASE)
    loaded, _ = load_bank(tmp_path / "bank")
    (with_basis, without) = (entry.scope.space for entry in loaded if entry.scope is not None)
    saved = next(iter(bank)).scope
    assert saved is not None and saved.space.basis is not None and with_basis.basis is not None
    assert torch.equal(with_basis.basis, saved.space.basis) and without.basis is None
    hidden = torch.randn(3, 32)
    assert torch.equal(with_basis.project(hidden), saved.space.project(hidden))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda t: t["scope_bases"].__setitem__((0, 0), float("nan")), "scope_bases holds a value that is not finite"),
    (lambda t: t.__setitem__("basis_offsets", torch.tensor([0, 33, 33])),
     "basis_offsets must rise from 0 to the 3 rows of scope_bases"),
    (lambda t: t.__setitem__("scope_bases", torch.randn(33, 32)) or t.__setitem__(
        "basis_offsets", torch.tensor([0, 33, 33])), "gives scope space 0 33 basis rows, more than the hidden size 32"),
    (lambda t: t.pop("basis_offsets"), "scope basis tensor 'basis_offsets' is missing"),
])
def test_damaged_bases_are_refused_naming_the_tensor(damage: Any, message: str) -> None:
    tensors, rows = encode(routed_bank(32))
    damage(tensors)
    with pytest.raises(ValueError, match=message):
        decode(rows, tensors, 3, 64, 32)
