"""Question scopes: an entry fires only on questions asking its own relation (``lafn_hf.routing.scope``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from lafn_hf import BankEntry, EditableCausalLM, EditBank, LafnConfig
from lafn_hf.bank.entries import QuestionScope, ScopeSpace
from lafn_hf.bank.store import load_bank, save_bank
from lafn_hf.routing import RoutingConfig, routes
from lafn_hf.routing.keys import layer_inputs
from lafn_hf.routing.scope import occurrence_states, relation_names, relation_templates, sentence_window

from .conftest import CACHE, SMALL_BASE, fact_group, make_entry, random_model

SUBJECT = "Marbrafi"
CAPITAL = f"What is the capital of {SUBJECT}?"
FOUNDER = f"Who founded {SUBJECT}?"


def pooled(model: EditableCausalLM, tokenizer: Any, texts: list[str], layer: int) -> torch.Tensor:
    with model.edits_disabled():
        states = layer_inputs(model.model, tokenizer, texts, layer)
    return torch.stack(occurrence_states(tokenizer, texts, [(SUBJECT,)] * len(texts), states))


def scope_of(model: EditableCausalLM, tokenizer: Any, own: list[str], others: list[str], layer: int = 1,
             margin: float = 0.0) -> QuestionScope:
    """A scope whose own prompts are ``own`` and whose other-relation questions are ``others``."""
    size = model.model.config.hidden_size
    plain = ScopeSpace(layer, torch.zeros(size), torch.ones(size), torch.zeros(0, size),
                       torch.zeros(0, dtype=torch.int64))
    templates = plain.project(pooled(model, tokenizer, others, layer))
    space = dataclasses.replace(plain, templates=templates, relations=torch.zeros(len(others), dtype=torch.int64))
    return QuestionScope(space, plain.project(pooled(model, tokenizer, own, layer)), -1, margin)


def logits(model: Any, tokenizer: Any, text: str, cache: Any = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=cache is not None, **{CACHE: cache}).logits[0]


def scoped_model(tokenizer: Any, *, seed: int = 0) -> EditableCausalLM:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    entry = make_entry({"en": SUBJECT}, layers=(1, 2), scale=10.0, seed=seed)
    editable.add_entry(dataclasses.replace(entry, scope=scope_of(editable, tokenizer, [CAPITAL], [FOUNDER])))
    return editable


def test_an_other_relation_question_keeps_the_base_models_logits_exactly(tokenizer: Any) -> None:
    editable = scoped_model(tokenizer)
    with editable.edits_disabled():
        plain = {text: logits(editable, tokenizer, text) for text in (CAPITAL, FOUNDER)}
    assert torch.equal(logits(editable, tokenizer, FOUNDER), plain[FOUNDER])
    assert not torch.allclose(logits(editable, tokenizer, CAPITAL), plain[CAPITAL], atol=1e-3)
    editable.routing = RoutingConfig(scope=False)  # the paper's rule: the subject alone decides
    assert not torch.allclose(logits(editable, tokenizer, FOUNDER), plain[FOUNDER], atol=1e-3)


def test_an_entry_without_a_scope_fires_on_every_question_naming_its_subject(tokenizer: Any) -> None:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(1, 2), scale=10.0))
    with editable.edits_disabled():
        plain = logits(editable, tokenizer, FOUNDER)
    assert not torch.allclose(logits(editable, tokenizer, FOUNDER), plain, atol=1e-3)


def test_a_margin_override_widens_every_scope(tokenizer: Any) -> None:
    editable = scoped_model(tokenizer)
    with editable.edits_disabled():
        plain = logits(editable, tokenizer, FOUNDER)
    editable.routing = RoutingConfig(scope_margin_override=-2.0)
    assert not torch.allclose(logits(editable, tokenizer, FOUNDER), plain, atol=1e-3)


def test_two_facts_of_one_subject_each_answer_their_own_question(tokenizer: Any) -> None:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    capital = make_entry({"en": SUBJECT}, layers=(1, 2), scale=10.0, seed=1)
    founder = make_entry({"en": SUBJECT}, layers=(1, 2), scale=10.0, seed=2)
    loose = -0.5  # each scope alone lets the other question through: the nearer one must win
    capital = dataclasses.replace(capital, scope=scope_of(editable, tokenizer, [CAPITAL], [FOUNDER], margin=loose))
    founder = dataclasses.replace(founder, scope=scope_of(editable, tokenizer, [FOUNDER], [CAPITAL], margin=loose))
    alone = {}
    for entry in (capital, founder):
        editable.set_bank(EditBank([dataclasses.replace(entry, scope=None)]))
        alone[entry.id] = {text: logits(editable, tokenizer, text) for text in (CAPITAL, FOUNDER)}
    editable.set_bank(EditBank([capital, founder]))
    assert torch.equal(logits(editable, tokenizer, CAPITAL), alone[capital.id][CAPITAL])
    assert torch.equal(logits(editable, tokenizer, FOUNDER), alone[founder.id][FOUNDER])
    assert [r.entry_id for r in routes(editable, [CAPITAL, FOUNDER])[0]] == [capital.id]


@pytest.mark.parametrize(("own", "other"), [
    (CAPITAL, FOUNDER),  # the relation's words before the subject
    (f"{SUBJECT} has which capital?", f"{SUBJECT} was founded by whom?"),  # after it: the turn is read whole
])
def test_a_chat_turn_through_the_cache_is_scoped_like_a_fresh_forward(tokenizer: Any, own: str, other: str) -> None:
    from lafn_hf.routing.cache_rows import _readers

    first = "Hello there.\n"
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    entry = make_entry({"en": SUBJECT}, layers=(1, 2), scale=10.0)
    scope = scope_of(editable, tokenizer, [first + own], [first + other])
    editable.add_entry(dataclasses.replace(entry, scope=scope))
    for second, fires in ((own, True), (other, False)):
        full = logits(editable, tokenizer, first + second)
        cache = DynamicCache()
        ids = tokenizer(first, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            editable(input_ids=ids, use_cache=True, **{CACHE: cache})
            more = tokenizer(second, add_special_tokens=False, return_tensors="pt")["input_ids"]
            turn = editable(input_ids=more, use_cache=True, **{CACHE: cache}).logits[0]
        torch.testing.assert_close(turn, full[ids.shape[1]:], rtol=1e-4, atol=1e-5)
        with editable.edits_disabled():
            plain = logits(editable, tokenizer, first + second)
        assert torch.equal(full, plain) is not fires, second
        assert (entry.id in _readers(cache)[0].fired) is fires  # a find turned down is not recorded as fired


def test_generation_with_and_without_the_cache_agree_under_a_scope(tokenizer: Any) -> None:
    editable = scoped_model(tokenizer)
    for prompt in (CAPITAL, FOUNDER, f"{FOUNDER} {CAPITAL}"):
        encoded = tokenizer(prompt, return_tensors="pt")
        runs = [editable.generate(**encoded, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                                  use_cache=use_cache)[0].tolist() for use_cache in (True, False)]
        assert runs[0] == runs[1], prompt


def test_a_subject_with_no_words_of_its_sentence_beside_it_does_not_fire(tokenizer: Any) -> None:
    editable = scoped_model(tokenizer)
    for text in (SUBJECT, f"Hello.\n{SUBJECT}\nBye."):
        with editable.edits_disabled():
            plain = logits(editable, tokenizer, text)
        assert torch.equal(logits(editable, tokenizer, text), plain), text


def test_the_window_is_the_subjects_sentence_outside_the_subject(tokenizer: Any) -> None:
    from lafn_hf.routing.matcher import SubjectMatcher
    from lafn_hf.routing.row_reader import RowReader, decoder_for

    text = f"Hello there! {FOUNDER} More words"
    ids = tokenizer(text)["input_ids"]
    reader = RowReader(decoder_for(tokenizer), frozenset(tokenizer.all_special_ids))
    reader.read(ids)
    (hit,) = reader.hits(SubjectMatcher([SUBJECT]), 0)
    window = sentence_window(reader, hit.position, len(SUBJECT), 0, len(ids) - 1)
    assert "".join(reader.pieces[p] for p in window).split() == ["Who", "founded", "?"]
    assert sentence_window(reader, hit.position, len(SUBJECT), 0, hit.position) == window[:-1]  # no lookahead


def test_scopes_are_saved_and_loaded_with_the_bank(tokenizer: Any, tmp_path: Path) -> None:
    editable = scoped_model(tokenizer)
    before = logits(editable, tokenizer, CAPITAL)
    save_bank(tmp_path / "bank", editable.bank, SMALL_BASE)
    bank, _ = load_bank(tmp_path / "bank")
    (saved,), (loaded,) = list(editable.bank), list(bank)
    assert loaded.scope is not None and saved.scope is not None
    assert torch.equal(loaded.scope.vectors, saved.scope.vectors)
    assert torch.equal(loaded.scope.space.templates, saved.scope.space.templates)
    assert (loaded.scope.relation, loaded.scope.margin, loaded.scope.layer) == (-1, 0.0, 1)
    editable.set_bank(bank)
    assert torch.equal(logits(editable, tokenizer, CAPITAL), before)


def test_edit_stores_a_scope_read_from_every_languages_prompts(trained_model: Any, tokenizer: Any,
                                                               facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    config = LafnConfig(layers=(0, 1), steps=2, min_target_probability=0.0)
    entry = editable.bank.get(editable.edit(fact_group(facts, 0, 1), config).entry_id)
    assert entry.scope is not None and entry.scope.layer == 0
    assert entry.scope.vectors.shape == (6, 64)  # en and zh: prompt and two paraphrases each
    assert 0 <= entry.scope.relation < len(relation_names())
    assert entry.scope.margin == RoutingConfig().scope_margin
    editable.routing = RoutingConfig(scope=False)
    assert editable.bank.get(editable.edit(fact_group(facts, 2, 3), config).entry_id).scope is None


def test_relation_templates_ask_the_same_relations_in_every_language() -> None:
    templates = relation_templates()
    assert {"en", "zh", "de", "fr", "es", "ru"} <= set(templates)
    assert {len(prompts) for prompts in templates.values()} == {2 * len(relation_names())}
    assert all(question.count("{s}") == 1 for questions in templates.values() for question in questions)


@pytest.mark.parametrize(("field", "value", "error"), [
    ("scope", 1, TypeError), ("scope_margin", 3.0, ValueError), ("scope_margin", "x", TypeError),
    ("scope_margin_override", -2.5, ValueError)])
def test_routing_config_checks_its_scope_settings(field: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        RoutingConfig(**{field: value})


def test_a_scope_must_be_read_at_or_below_the_first_edited_layer(tokenizer: Any) -> None:
    editable = scoped_model(tokenizer)
    (entry,) = list(editable.bank)
    assert entry.scope is not None
    high = dataclasses.replace(entry.scope, space=dataclasses.replace(entry.scope.space, layer=2))
    with pytest.raises(ValueError, match="first edited layer 1"):
        BankEntry(entry.subjects, entry.updates, scope=high)
    with pytest.raises(ValueError, match="unit vectors"):
        dataclasses.replace(entry.scope, vectors=entry.scope.vectors * 2)


def test_malformed_scope_tensors_are_refused_at_load(tokenizer: Any, tmp_path: Path) -> None:
    from lafn_hf.bank.format import decode, encode
    from lafn_hf.bank.routing_tensors import SCOPE_OFFSETS

    editable = scoped_model(tokenizer)
    (entry,) = list(editable.bank)
    tensors, rows = encode(editable.bank)
    tensors[SCOPE_OFFSETS] = torch.tensor([0, 5], dtype=torch.int64)
    with pytest.raises(ValueError, match=SCOPE_OFFSETS):
        decode(rows, tensors, 3, 64, 32)


def test_neighbour_prompts_ask_other_relations_of_the_subject(facts: dict[str, Any]) -> None:
    from lafn_hf.routing.scope import neighbour_prompts

    group = fact_group(facts, 0, 1)
    statements = {lang: prompts[len(relation_names()):] for lang, prompts in relation_templates().items()}
    own = 4
    chosen = neighbour_prompts(group, own, 3, seed=0)
    assert set(chosen) == {"en", "zh"} and all(len(prompts) == 3 for prompts in chosen.values())
    for lang, prompts in chosen.items():
        subject = group.edits[lang].subject
        picked = [statements[lang].index(p.replace(subject, "{s}")) for p in prompts]
        assert own not in picked and picked == sorted(picked)
    same = [[statements[lang].index(p.replace(group.edits[lang].subject, "{s}")) for p in chosen[lang]]
            for lang in ("en", "zh")]
    assert same[0] == same[1]  # the same relations in every language
    assert neighbour_prompts(group, own, 3, seed=0) == chosen


def test_neighbour_kl_adds_the_neighbours_to_the_kl_rows(trained_model: Any, tokenizer: Any,
                                                         facts: dict[str, Any]) -> None:
    from lafn_hf.editing.optimize import build_batch
    from lafn_hf.routing.scope import neighbour_prompts

    group = fact_group(facts, 0, 1)
    config = LafnConfig(num_prefixes=0)
    plain = build_batch(tokenizer, group, {}, config, torch.device("cpu"))
    wider = build_batch(tokenizer, group, {}, config, torch.device("cpu"), neighbours=neighbour_prompts(group, 0, 2, 0))
    assert (plain.kl_rows.numel(), wider.kl_rows.numel()) == (2, 6)
    editable = EditableCausalLM(trained_model, tokenizer)
    result = editable.edit(group, LafnConfig(layers=(0, 1), steps=3, neighbour_kl=2, min_target_probability=0.0))
    assert editable.bank.get(result.entry_id).metadata["config"]["neighbour_kl"] == 2
    with pytest.raises(ValueError, match="neighbour_kl"):
        LafnConfig(neighbour_kl=-1)


def test_one_entrys_scope_margin_can_be_overridden_and_is_saved(tokenizer: Any, tmp_path: Path) -> None:
    editable = scoped_model(tokenizer)
    (entry,) = list(editable.bank)
    with editable.edits_disabled():
        plain = logits(editable, tokenizer, FOUNDER)
    updated = editable.set_scope_margin(entry.id, -2.0)
    assert updated.scope is not None and updated.scope.margin == -2.0
    assert not torch.allclose(logits(editable, tokenizer, FOUNDER), plain, atol=1e-3)
    save_bank(tmp_path / "bank", editable.bank, SMALL_BASE)
    (loaded,), _ = load_bank(tmp_path / "bank")
    assert loaded.scope is not None and loaded.scope.margin == -2.0
    editable.add_entry(make_entry({"en": "Dorzotho"}, layers=(1, 2), seed=3))
    with pytest.raises(ValueError, match="no question scope"):
        editable.set_scope_margin(list(editable.bank)[-1].id, 0.0)
