"""Routing's representation stage: keys made at edit time, their calibration, firing in the forward (cache,
padding), relation choice among entries on one subject, and keys in saved banks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from lafn_hf import BankEntry, EditableCausalLM, EditBank, EditGroup, LafnConfig, LanguageEdit
from lafn_hf.bank.entries import KeySpace, RoutingKey
from lafn_hf.bank.store import load_bank, save_bank
from lafn_hf.routing import RoutingConfig, layer_inputs, routes
from lafn_hf.routing.cache_rows import returned_cache
from lafn_hf.routing.keys import calibrate_key_space, entry_key, head_states, key_space, negative_states, subject_head
from lafn_hf.routing.matcher import SubjectMatcher

from .conftest import CACHE, fact_group, greedy, make_entry, random_model

SUBJECT = "Marbrafi"
PROMPT = f"The capital of {SUBJECT} is"


def keyed_model(tokenizer: Any, key_text: str, subject: str = "Zorblat", layer: int = 1,
                threshold: float = 0.99) -> tuple[EditableCausalLM, BankEntry, int]:
    """A random 3-layer model whose bank entry (subject never in the texts) has as key the state of the token
    of SUBJECT in ``key_text``: the representation stage fires there and nowhere else."""
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    raw = negative_states(editable.model, tokenizer, layer)
    space = key_space(layer, raw)
    ids, hidden = layer_inputs(editable.model, tokenizer, [key_text], layer)[0]
    position = max(i for i in range(len(ids)) if SUBJECT in tokenizer.decode(ids[: i + 1])
                   and SUBJECT not in tokenizer.decode(ids[:i]))
    vector = space.project(hidden[position]).contiguous()
    entry = make_entry({"en": subject}, layers=(layer, 2), size=64, scale=3.0)
    entry = BankEntry(entry.subjects, entry.updates, key=RoutingKey(space, vector, threshold))
    editable.add_entry(entry)
    return editable, entry, position


def test_the_representation_stage_fires_once_where_the_key_matches(tokenizer: Any) -> None:
    editable, entry, position = keyed_model(tokenizer, PROMPT)
    twice = f"{PROMPT} {PROMPT}"
    assert routes(editable, [PROMPT, "The capital of Thofilun is", twice]) == [
        [routes_entry(position, entry.id)], [], [routes_entry(position, entry.id)]]
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        edited = editable(**ids).logits[0]
        with editable.edits_disabled():
            plain = editable(**ids).logits[0]
    assert torch.equal(edited[:position], plain[:position])  # causal: nothing changes before the token
    assert not torch.allclose(edited[position:], plain[position:])
    editable.routing = RoutingConfig(representation=False)
    with torch.no_grad():
        assert torch.equal(editable(**ids).logits[0], plain)


def routes_entry(position: int, entry_id: str) -> Any:
    from lafn_hf.routing import Route

    return Route(0, position, entry_id, "representation")


def test_representation_routing_is_the_same_with_a_kv_cache_and_padding(tokenizer: Any) -> None:
    editable, _, position = keyed_model(tokenizer, PROMPT)
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        full = editable(input_ids=torch.tensor([ids])).logits[0]
        cache = DynamicCache()
        stepped = []
        for token in ids:
            out = editable(input_ids=torch.tensor([[token]]), use_cache=True, **{CACHE: cache})
            cache = returned_cache(out)
            stepped.append(out.logits[0, -1])
        assert torch.allclose(torch.stack(stepped), full, atol=1e-5)
        other = tokenizer("In Thofilun, the capital is a city")["input_ids"]
        width = max(len(ids), len(other))
        batch = torch.tensor([[0] * (width - len(ids)) + ids, [0] * (width - len(other)) + other])
        mask = (torch.arange(width)[None, :] >= torch.tensor([[width - len(ids)], [width - len(other)]])).long()
        padded = editable(input_ids=batch, attention_mask=mask).logits[0, width - len(ids):]
    assert torch.allclose(padded, full, atol=1e-4)
    assert [r.position for r in routes(editable, [PROMPT])[0]] == [position]  # the key did fire in these forwards


def test_relation_choice_picks_the_entry_whose_key_matches_the_question(tokenizer: Any) -> None:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    raw = negative_states(editable.model, tokenizer, 1)
    space = key_space(1, raw)
    contexts = [PROMPT, f"In {SUBJECT}, the capital is"]
    entries = []
    for seed, context in enumerate(contexts):
        ids, hidden = layer_inputs(editable.model, tokenizer, [context], 1)[0]
        hit = SubjectMatcher([SUBJECT]).find(context)[0]
        position = max(i for i in range(len(ids)) if len(tokenizer.decode(ids[1: i + 1])) <= hit.end)
        entry = make_entry({"en": SUBJECT}, layers=(1,), seed=seed)
        entries.append(BankEntry(entry.subjects, entry.updates, id=f"relation-{seed}",
                                 key=RoutingKey(space, space.project(hidden[position]).contiguous(), 1.0)))
        editable.add_entry(entries[-1])
    found = routes(editable, contexts)
    assert [[(r.entry_id, r.stage) for r in hits] for hits in found] == [
        [("relation-0", "relation")], [("relation-1", "relation")]]
    editable.routing = RoutingConfig(representation=False)  # without keys both entries add up, as before
    assert [sorted(r.entry_id for r in hits) for hits in routes(editable, contexts)] == [
        ["relation-0", "relation-1"], ["relation-0", "relation-1"]]


def test_edit_stores_a_calibrated_key_and_unrelated_prompts_stay_bit_exact(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    unrelated = [f"The capital of {facts['facts'][i]['en']['subject']} is" for i in range(5, 9)]
    before = [greedy(editable, tokenizer, prompt) for prompt in unrelated]
    result = editable.edit(fact_group(facts, 0, 1))
    key = editable.bank.get(result.entry_id).key
    assert key is not None and key.layer == 0 and 0.7 <= key.threshold <= 1.0
    assert abs(float(key.vector.norm()) - 1) < 1e-5
    assert [greedy(editable, tokenizer, prompt) for prompt in unrelated] == before
    assert all(found == [] for found in routes(editable, unrelated))
    without = EditableCausalLM(trained_model.__class__.from_pretrained(Path(tokenizer.name_or_path)).eval(), tokenizer,
                               routing=RoutingConfig(representation=False))
    assert without.bank.get(without.edit(fact_group(facts, 0, 1)).entry_id).key is None


@pytest.mark.parametrize(("subject", "head"), [
    ("Suryamani massacre", "massacre"), ("苏里亚马尼大屠杀", "大屠杀"), ("约翰·布莱恩·泰勒", "泰勒"), ("Francium", None),
    ("Rom", None)])
def test_the_head_of_a_subject_names_its_kind(subject: str, head: str | None) -> None:
    assert subject_head(subject) == head


def test_a_key_does_not_fire_at_its_subjects_head_alone(trained_model: Any, tokenizer: Any,
                                                        facts: dict[str, Any]) -> None:
    """The key of "Marbrafi Thofilun" is calibrated above the state at "Thofilun" standing alone (on the toy
    the first edited layer reads embeddings, so the two states are the same: the key must not fire there)."""
    first, second = (facts["facts"][i]["en"]["subject"] for i in (0, 1))
    editable = EditableCausalLM(trained_model, tokenizer)
    space, negatives = calibrate_key_space(trained_model, tokenizer, 0)
    group = EditGroup({"en": LanguageEdit(f"The capital of {first} {second} is", f"{first} {second}", "Notes")})
    key = entry_key(trained_model, tokenizer, group, space, negatives, editable.routing)
    assert key is not None and key.threshold == 1.0
    (alone,) = head_states(trained_model, tokenizer, group, space)
    assert float(alone @ key.vector) > 0.99  # the same token's embedding


def test_banks_keep_aliases_and_keys_bit_exact(tmp_path: Path, tokenizer: Any) -> None:
    editable, entry, _ = keyed_model(tokenizer, PROMPT)
    editable.add_aliases(entry.id, ["Zorblatia"])
    other = make_entry({"en": "Thofilun"}, layers=(1,), seed=3)
    editable.add_entry(other)
    editable.save_pretrained(tmp_path / "bank")
    loaded, _ = load_bank(tmp_path / "bank")
    original = editable.bank.get(entry.id)
    again = loaded.get(entry.id)
    assert again.aliases == ("Zorblatia",) and loaded.get(other.id).key is None
    assert again.key is not None and original.key is not None
    assert torch.equal(again.key.vector, original.key.vector) and again.key.threshold == original.key.threshold
    assert torch.equal(again.key.space.mean, original.key.space.mean)
    assert torch.equal(again.key.space.scale, original.key.space.scale)


def test_malformed_routing_data_is_refused() -> None:
    space = KeySpace(1, torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="norm 1"):
        RoutingKey(space, torch.ones(4), 0.8)
    with pytest.raises(ValueError, match="size 3"):
        RoutingKey(space, torch.ones(3) / 3**0.5, 0.8)
    with pytest.raises(ValueError, match="cosine in"):
        RoutingKey(space, torch.ones(4) / 2, 1.5)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        KeySpace(1, torch.zeros(4), torch.zeros(4))
    entry = make_entry({"en": SUBJECT}, layers=(0,))
    with pytest.raises(ValueError, match="at or below its first edited layer"):
        BankEntry(entry.subjects, entry.updates, key=RoutingKey(space, torch.ones(4) / 2, 0.8))
    for bad in (dict(threshold_floor=2.0), dict(threshold_margin=-0.1), dict(threshold=1.5)):
        with pytest.raises(ValueError, match="RoutingConfig"):
            RoutingConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RoutingConfig.normalize"):
        RoutingConfig(normalize="yes")  # type: ignore[arg-type]


def test_a_bank_with_keys_missing_a_routing_tensor_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    from safetensors.torch import load_file, save_file

    editable, _, _ = keyed_model(tokenizer, PROMPT)
    directory = save_bank(tmp_path / "bank", editable.bank, editable.base_ref)
    weights = next(directory.glob("lafn_bank-*.safetensors"))
    tensors = load_file(weights)
    del tensors["key_thresholds"]
    save_file(tensors, weights)
    import hashlib
    import json

    config = json.loads((directory / "lafn_config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    new_name = f"lafn_bank-{config['weights_sha256'][:16]}.safetensors"
    weights.rename(directory / new_name)
    config["weights_file"] = new_name
    (directory / "lafn_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="key_thresholds"):
        load_bank(directory)


def test_incremental_updates_with_keys_equal_a_rebuild(tokenizer: Any) -> None:
    from lafn_hf.routing.compiled import CompiledBank

    editable, entry, _ = keyed_model(tokenizer, PROMPT)
    cpu = torch.device("cpu")
    editable._injector.compiled(cpu)
    extra = make_entry({"en": "Thofilun"}, layers=(1,), seed=4)
    editable.add_entry(extra)
    editable.add_aliases(entry.id, ["Zorblatia"])
    incremental = editable._injector.compiled(cpu)
    rebuilt = CompiledBank.build(editable.bank, cpu, editable.routing)
    assert incremental.entries_of == rebuilt.entries_of and incremental.keys.keys() == rebuilt.keys.keys()
    assert incremental.entries_of["Zorblatia"] == (entry.id,) and extra.id not in incremental.keys


def test_a_chinese_question_reaches_an_english_only_edit_through_its_key(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    """The toy's layer 0 (an MLP without attention) maps each country's English and Chinese names to close
    states, so keys read at layer 1 are shared across the two languages (16 of its first 20 facts). The key
    stage alone: the toy's question scopes are read from its embeddings, which do not carry the relation."""
    editable = EditableCausalLM(trained_model, tokenizer, routing=RoutingConfig(scope=False))
    config = LafnConfig(layers=(1, 2), steps=2, min_target_probability=0.0)
    reached = []
    for source in range(4):
        result = editable.edit(fact_group(facts, source, source + 10, languages=("en",)), config)
        question = facts["templates"]["zh"][0].format(s=facts["facts"][source]["zh"]["subject"])
        found = routes(editable, [question])[0]
        assert all(r.stage == "representation" for r in found)  # the zh subject is in no entry
        reached.append([r.entry_id for r in found] == [result.entry_id])
    assert sum(reached) >= 3, reached
    unrelated = [facts["templates"]["zh"][0].format(s=facts["facts"][i]["zh"]["subject"]) for i in range(20, 30)]
    assert all(found == [] for found in routes(editable, unrelated))


def test_keys_are_calibrated_against_the_other_entries_keys(tokenizer: Any) -> None:
    from lafn_hf.routing.keys import separate

    editable, first, _ = keyed_model(tokenizer, PROMPT, threshold=0.5)
    assert first.key is not None
    close = first.key.vector + 0.3 * torch.linspace(-1, 1, first.key.vector.numel())
    second = BankEntry({"en": "Thofilun"}, first.updates,
                       key=RoutingKey(first.key.space, close / close.norm(), 0.5))
    cosine = float(second.key.vector @ first.key.vector) if second.key is not None else 0.0
    updated, raised = separate(editable.bank, second, margin=0.05)
    assert updated.key is not None and updated.key.threshold == pytest.approx(min(1.0, cosine + 0.05))
    assert [(e.id, e.key.threshold if e.key else None) for e in raised] == [(first.id, updated.key.threshold)]
    far = BankEntry({"en": "Dorzotho"}, first.updates, key=RoutingKey(first.key.space, -first.key.vector, 0.5))
    assert separate(editable.bank, far, margin=0.05) == (far, [])


def test_separating_a_merged_bank_equals_editing_into_one_bank(tokenizer: Any) -> None:
    from lafn_hf.routing.keys import separate, separate_all

    editable, first, _ = keyed_model(tokenizer, PROMPT, threshold=0.3)
    assert first.key is not None
    generator = torch.Generator().manual_seed(0)
    entries = [first]
    for i in range(4):
        vector = first.key.vector + 0.4 * torch.randn(first.key.vector.numel(), generator=generator)
        entries.append(BankEntry({"en": f"Name{i}x"}, first.updates, id=f"e{i}",
                                 key=RoutingKey(first.key.space, vector / vector.norm(), 0.3)))
    one_by_one = EditBank()
    for entry in entries:
        entry, raised = separate(one_by_one, entry, 0.05)
        for other in raised:
            one_by_one.replace(other)
        one_by_one.add(entry)
    merged = EditBank(entries)
    changed = separate_all(merged, 0.05, block=2)
    thresholds = [[e.key.threshold for e in bank if e.key is not None] for bank in (one_by_one, merged)]
    assert thresholds[0] == pytest.approx(thresholds[1], abs=1e-6)
    assert changed == sum(t > 0.3 for t in thresholds[1]) >= 3
    assert [e.id for e in merged] == [e.id for e in entries]
