from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lafn_hf import BankEntry, EditableCausalLM, EditBank, LayerUpdate
from lafn_hf import hub as hub_module
from lafn_hf.hub import BANK_CONFIG_NAME, BANK_WEIGHTS_NAME, load_bank

from .conftest import make_entry, random_model


def editable_with_entries(tokenizer: Any, count: int = 2) -> EditableCausalLM:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer, base_revision="abc123")
    for i in range(count):
        editable.add_entry(make_entry({"en": f"Subject{i}", "zh": f"主题{i}"}, layers=(0, 2), seed=i))
    return editable


def test_round_trip_is_bit_exact(tokenizer: Any, tmp_path: Path) -> None:
    editable = editable_with_entries(tokenizer)
    editable.save_pretrained(tmp_path / "bank")
    bank, base = load_bank(tmp_path / "bank")
    assert base.revision == "abc123" and base.model_type == "llama" and base.intermediate_size == 64
    assert [e.id for e in bank] == [e.id for e in editable.bank]
    for saved, loaded in zip(editable.bank, bank):
        assert loaded.subjects == saved.subjects and loaded.metadata == saved.metadata
        for layer in saved.updates:
            assert torch.equal(loaded.updates[layer].neurons, saved.updates[layer].neurons)
            assert torch.equal(loaded.updates[layer].delta, saved.updates[layer].delta)
    config = json.loads((tmp_path / "bank" / BANK_CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["library"] == "lafn-hf"
    card = (tmp_path / "bank" / "README.md").read_text()
    assert "library_name: lafn-hf" in card and "Subject1" in card


def test_load_onto_a_mismatched_base_raises(tokenizer: Any, tmp_path: Path) -> None:
    editable_with_entries(tokenizer).save_pretrained(tmp_path / "bank")
    other = EditableCausalLM(random_model("qwen2", len(tokenizer)), tokenizer)
    with pytest.raises(ValueError, match="model_type: bank has 'llama', model has 'qwen2'"):
        other.load_bank(tmp_path / "bank")
    assert len(other.bank) == 0


def test_truncated_file_raises_and_a_failed_save_keeps_the_old_bank(tokenizer: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    editable = editable_with_entries(tokenizer)
    target = tmp_path / "bank"
    editable.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    broken = tmp_path / "broken"
    editable.save_pretrained(broken)
    data = (broken / BANK_WEIGHTS_NAME).read_bytes()
    (broken / BANK_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_bank(broken)

    def failing_save(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    editable.add_entry(make_entry({"en": "Another"}, layers=(1,)))
    monkeypatch.setattr(hub_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        editable.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_over_existing_keeps_other_files(tokenizer: Any, tmp_path: Path) -> None:
    editable = editable_with_entries(tokenizer, count=1)
    editable.save_pretrained(tmp_path / "bank")
    (tmp_path / "bank" / "notes.txt").write_text("mine")
    editable.add_entry(make_entry({"en": "Another"}, layers=(1,)))
    editable.save_pretrained(tmp_path / "bank")
    assert (tmp_path / "bank" / "notes.txt").read_text() == "mine"
    assert len(load_bank(tmp_path / "bank")[0]) == 2


def test_from_pretrained_loads_base_and_bank(tokenizer: Any, tmp_path: Path) -> None:
    base = random_model("llama", len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    editable = EditableCausalLM.from_pretrained(tmp_path / "base")
    editable.add_entry(make_entry({"en": "Marbrafi"}))
    editable.save_pretrained(tmp_path / "bank")
    reloaded = EditableCausalLM.from_pretrained(tmp_path / "bank")
    assert [e.id for e in reloaded.bank] == [e.id for e in editable.bank]
    ids = tokenizer(["The capital of Marbrafi is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, editable(ids).logits)


def test_push_to_hub_uploads_the_bank_folder(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}

    class StubApi:
        def __init__(self, token: str | None = None) -> None:
            calls["token"] = token

        def create_repo(self, repo_id: str, **kwargs: Any) -> None:
            calls["create_repo"] = (repo_id, kwargs)

        def create_branch(self, repo_id: str, **kwargs: Any) -> None:
            calls["create_branch"] = (repo_id, kwargs)

        def upload_folder(self, **kwargs: Any) -> str:
            calls["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            calls["upload"] = kwargs
            return "https://hub.example/commit/1"

    monkeypatch.setattr(hub_module, "HfApi", StubApi)
    editable = editable_with_entries(tokenizer)
    url = editable.push_to_hub("me/capitals", private=True, token="t0k", revision="v1")
    assert url == "https://hub.example/commit/1"
    assert calls["token"] == "t0k"
    assert calls["create_repo"] == ("me/capitals", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["create_branch"][1]["branch"] == "v1"
    assert calls["files"] == sorted(["README.md", BANK_CONFIG_NAME, BANK_WEIGHTS_NAME])
    assert calls["upload"]["repo_id"] == "me/capitals" and calls["upload"]["revision"] == "v1"
    assert "2 edits" in calls["upload"]["commit_message"]


def test_bank_merge_remove_and_overlapping_subjects(tokenizer: Any) -> None:
    first, second = make_entry({"en": "Paris"}, seed=1), make_entry({"en": "Paris"}, seed=2)
    bank = EditBank([first]).merge(EditBank([second, first]))
    assert [e.id for e in bank] == [first.id, second.id]
    assert bank.subject_index() == {"Paris": (first.id, second.id)}
    bank.remove(first.id)
    assert bank.subject_index() == {"Paris": (second.id,)}
    with pytest.raises(ValueError, match=f"no entry '{first.id}'"):
        bank.remove(first.id)
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add(second)


def test_overlapping_entries_add_up(tokenizer: Any) -> None:
    """Two entries on the same subject: their dV sum, exactly like one entry with the summed dV."""
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    ids = tokenizer(["The capital of Marbrafi is"], return_tensors="pt")["input_ids"]
    entry = make_entry({"en": "Marbrafi"}, layers=(1,))
    update = entry.updates[1]
    editable.add_entry(BankEntry(subjects=entry.subjects, updates={1: LayerUpdate(update.neurons, 2 * update.delta)}))
    with torch.no_grad():
        doubled = editable(ids).logits
    editable.set_bank(EditBank([entry, BankEntry(subjects=entry.subjects, updates=entry.updates)]))
    with torch.no_grad():
        twice = editable(ids).logits
    torch.testing.assert_close(twice, doubled, rtol=1e-5, atol=1e-5)
