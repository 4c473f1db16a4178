from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lafn_hf import BankEntry, EditableCausalLM, EditBank, LayerUpdate
from lafn_hf.bank import hub as hub_module
from lafn_hf.bank.base_model import BaseModelRef
from lafn_hf.bank.hub import resolve_bank_dir
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME, BANK_WEIGHTS_NAME, FORMAT_VERSION
from lafn_hf.bank.store import load_bank, save_bank
from lafn_hf.cli import main
from lafn_hf.models import materialize

from .conftest import SMALL_BASE, make_entry, random_model, same_bank, weights_file


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
    assert config["format_version"] == FORMAT_VERSION and config["library"] == "lafn-hf"
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
    weights = weights_file(broken)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_bank(broken)

    real_replace = os.replace

    def failing_replace(source: Any, destination: Any) -> None:
        if Path(destination).name == BANK_CONFIG_NAME:
            raise OSError("disk full")
        real_replace(source, destination)

    editable.add_entry(make_entry({"en": "Another"}, layers=(1,)))
    monkeypatch.setattr(hub_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        editable.save_pretrained(target)
    monkeypatch.undo()
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
    weights = [name for name in calls["files"] if fnmatch.fnmatch(name, "lafn_bank-*.safetensors")]
    assert calls["files"] == sorted(["README.md", BANK_CONFIG_NAME, *weights]) and len(weights) == 1
    assert calls["upload"]["repo_id"] == "me/capitals" and calls["upload"]["revision"] == "v1"
    assert calls["upload"]["delete_patterns"] == ["lafn_bank*.safetensors"]  # older weights go
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


def test_format_1_banks_load_and_are_upgraded_by_the_next_save(tmp_path: Path) -> None:
    entry = make_entry({"en": "Old"}, layers=(0, 2))
    old = tmp_path / "old"
    old.mkdir()
    save_file({f"{entry.id}/{layer}/{kind}": getattr(update, kind) for layer, update in entry.updates.items()
               for kind in ("neurons", "delta")}, str(old / BANK_WEIGHTS_NAME), metadata={"format": "pt"})
    base = {"name_or_path": "acme/tiny", "revision": None, "model_type": "llama", "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 3}
    (old / BANK_CONFIG_NAME).write_text(json.dumps({
        "format_version": 1, "library": "lafn-hf", "library_version": "0.1.0", "base_model": base,
        "entries": [{"id": entry.id, "subjects": entry.subjects, "layers": [0, 2], "metadata": entry.metadata}]}))
    bank, ref = load_bank(old)
    assert same_bank(bank, EditBank([entry])) and ref == SMALL_BASE
    save_bank(old, bank, ref)
    assert not (old / BANK_WEIGHTS_NAME).exists() and same_bank(load_bank(old)[0], bank)


# -- integrity and strict parsing ---------------------------------------------------------------------
def test_a_flipped_byte_in_the_weights_is_detected(tmp_path: Path) -> None:
    save_bank(tmp_path / "bank", EditBank([make_entry({"en": "Alpha"})]), SMALL_BASE)
    path = weights_file(tmp_path / "bank")
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_size])
    start = header["deltas"]["data_offsets"][0]
    data[8 + header_size + start] ^= 0x01  # lowest mantissa bit of a float32 dV: still finite, still loads
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted or truncated: its sha256 is [0-9a-f]{64}, lafn_config.json records"):
        load_bank(tmp_path / "bank")


def _set_version(value: str) -> Callable[[dict[str, Any]], str]:
    def mutate(config: dict[str, Any]) -> str:
        config["format_version"] = "@@"
        return json.dumps(config).replace('"@@"', value)
    return mutate


def _entry(index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config["entries"][index].__setitem__(key, value)


def _top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config.__setitem__(key, value)


def _base(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config["base_model"].__setitem__(key, value)


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "entries is a string": (_top("entries", "abc"), r'entries must be an array, got string "abc"'),
    "an entry is a string": (lambda c: c["entries"].__setitem__(0, "abc"), r"entries\[0\] must be an object, got string"),
    "format_version 1e400": (_set_version("1e400"), r"format_version must be an integer \(1, 2, 3\), got number Infinity"),
    "format_version string": (_set_version('"1"'), r'format_version must be an integer \(1, 2, 3\), got string "1"'),
    "format_version float": (_set_version("1.9"), r"format_version must be an integer \(1, 2, 3\), got number 1.9"),
    "format_version bool": (_set_version("true"), r"format_version must be an integer \(1, 2, 3\), got true"),
    "format_version 0": (_set_version("0"), r"format_version must be one of 1, 2, 3, got 0"),
    "format_version newer": (_set_version("4"), r"format_version 4 was written by a newer lafn-hf"),
    "deep nesting": (lambda c: "[" * 100_000 + "]" * 100_000, r"is not valid JSON: nested too deeply"),
    "not JSON": (lambda c: '{"entries": [', r"is not valid JSON"),
    "top level is an array": (lambda c: "[]", r"the top level must be an object, got array"),
    "subjects a string": (_entry(0, "subjects", "x"), r"entries\[0\]\.subjects must be an object mapping languages"),
    "empty subject": (_entry(0, "subjects", {"en": " "}), r"entries\[0\]\.subjects must be an object mapping languages"),
    "id a number": (_entry(1, "id", 5), r"entries\[1\]\.id must be a string of 1-64 letters, digits, _ or -, got number 5"),
    "id not allowed": (_entry(1, "id", "a b"), r"entries\[1\]\.id must be a string of 1-64 letters, digits, _ or -"),
    "id used twice": (lambda c: c["entries"][1].__setitem__("id", c["entries"][0]["id"]),
                      r"entries\[1\]\.id '.*' is already used by entries\[0\]"),
    "metadata a list": (_entry(0, "metadata", []), r"entries\[0\]\.metadata must be an object, got array"),
    "base_model a list": (_top("base_model", []), r"base_model must be an object, got array"),
    "model_type missing": (lambda c: c["base_model"].__delitem__("model_type"), r"base_model\.model_type is missing"),
    "hidden_size a string": (_base("hidden_size", "32"), r'base_model\.hidden_size must be a positive integer, got string'),
    "revision a number": (_base("revision", 3), r"base_model\.revision must be a string or null"),
    "sha256 malformed": (_top("weights_sha256", "xyz"), r'weights_sha256 must be 64 lowercase hex digits, got string "xyz"'),
    "weights_file outside": (_top("weights_file", "../lafn_bank-0123456789abcdef.safetensors"), r"weights_file must be"),
    "weights_file not the sha's": (_top("weights_file", "lafn_bank-0123456789abcdef.safetensors"),
                                   r"weights_file 'lafn_bank-0123456789abcdef\.safetensors' does not match weights_sha256"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_config_raises_value_error_naming_the_field(tmp_path: Path, case: str) -> None:
    bank = EditBank([make_entry({"en": "Alpha"}, layers=(0, 1), seed=1), make_entry({"en": "Beta"}, seed=2)])
    save_bank(tmp_path / "bank", bank, SMALL_BASE)
    config_path = tmp_path / "bank" / BANK_CONFIG_NAME
    config = json.loads(config_path.read_text())
    mutate, message = MALFORMED[case]
    text = mutate(config)
    config_path.write_text(text if isinstance(text, str) else json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_bank(tmp_path / "bank")


# -- sharing the base model reference -----------------------------------------------------------------
def test_the_base_model_is_recorded_by_its_hub_id_when_known(tokenizer: Any, tmp_path: Path) -> None:
    model = random_model("llama", len(tokenizer))
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("a1" * 20)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    ref = BaseModelRef.from_model(AutoModelForCausalLM.from_pretrained(snapshot))
    assert (ref.name_or_path, ref.revision) == ("acme/tiny-llama", "a1" * 20) and ref.is_hub_id

    model.config._name_or_path = "acme/loaded-by-id"
    assert BaseModelRef.from_model(model).name_or_path == "acme/loaded-by-id"

    offline = tmp_path / "gemma-3-270m"  # an already materialised offline model (built before this change)
    model.save_pretrained(offline)
    tokenizer.save_pretrained(offline)
    (offline / ".lafn_complete").write_text("ok\n")
    assert materialize("gemma-3-270m", cache_dir=offline) == offline
    editable = EditableCausalLM.from_pretrained(offline)
    assert (editable.base_ref.name_or_path, editable.base_ref.revision) == ("google/gemma-3-270m", None)


def test_the_base_model_can_be_set_on_save_and_push_and_overridden_on_load(
        tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    random_model("llama", len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    editable = EditableCausalLM.from_pretrained(tmp_path / "base")
    editable.add_entry(make_entry({"en": "Marbrafi"}))
    assert editable.base_ref.name_or_path == str(tmp_path / "base")  # a local path: loads only here

    editable.save_pretrained(tmp_path / "shared", base_model="acme/tiny@v2")
    recorded = json.loads((tmp_path / "shared" / BANK_CONFIG_NAME).read_text())["base_model"]
    assert (recorded["name_or_path"], recorded["revision"]) == ("acme/tiny", "v2")
    assert "base_model: acme/tiny\n" in (tmp_path / "shared" / "README.md").read_text()
    with pytest.raises(ValueError, match="base_model must be a Hub id"):
        editable.save_pretrained(tmp_path / "x", base_model="not a repo")

    uploaded: list[str] = []

    class StubApi:
        def __init__(self, token: str | None = None) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs: Any) -> None:
            pass

        def upload_folder(self, **kwargs: Any) -> str:
            uploaded.append(json.loads((Path(kwargs["folder_path"]) / BANK_CONFIG_NAME).read_text())
                            ["base_model"]["name_or_path"])
            return "url"

    monkeypatch.setattr(hub_module, "HfApi", StubApi)
    with caplog.at_level(logging.WARNING, logger="lafn_hf.bank.hub"):
        editable.push_to_hub("me/bank")
    assert "base model is the local path" in caplog.text and "base_model='org/name'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lafn_hf.bank.hub"):
        editable.push_to_hub("me/bank", base_model="acme/tiny")
    assert caplog.text == "" and uploaded == [str(tmp_path / "base"), "acme/tiny"]

    editable.save_pretrained(tmp_path / "local")
    assert main(["push", str(tmp_path / "local"), "me/bank", "--dry-run", "--base-model", "acme/tiny@v3"]) == 0
    assert "would push 1 edit(s) for acme/tiny@v3 to me/bank" in capsys.readouterr().out

    (tmp_path / "base").rename(tmp_path / "moved")  # the bank now names a folder that is gone
    with pytest.raises(ValueError, match="which does not exist here; pass base_model="):
        EditableCausalLM.from_pretrained(tmp_path / "local")
    reloaded = EditableCausalLM.from_pretrained(tmp_path / "local", base_model=str(tmp_path / "moved"))
    assert same_bank(reloaded.bank, editable.bank)
    ids = tokenizer(["The capital of Marbrafi is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, editable(ids).logits)
    with pytest.raises(ValueError, match="base_model= only applies when loading an edit bank"):
        EditableCausalLM.from_pretrained(tmp_path / "moved", base_model="acme/tiny")


def test_hub_download_fetches_the_bank_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = EditBank([make_entry({"en": "Alpha"})])
    save_bank(tmp_path / "repo", bank, SMALL_BASE)
    (tmp_path / "repo" / "unrelated.bin").write_bytes(b"x")

    def fake_snapshot_download(repo_id: str, *, revision: str | None, token: str | None,
                               allow_patterns: list[str]) -> str:
        out = tmp_path / "snapshot"
        out.mkdir()
        for path in (tmp_path / "repo").iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, out / path.name)
        return str(out)

    monkeypatch.setattr(hub_module, "snapshot_download", fake_snapshot_download)
    local = resolve_bank_dir("me/bank")
    assert same_bank(load_bank(local)[0], bank) and not (local / "unrelated.bin").exists()


# -- sizes are checked wherever entries enter ---------------------------------------------------------
def test_entries_that_do_not_fit_the_model_are_refused_wherever_they_enter(tokenizer: Any) -> None:
    model = random_model("llama", len(tokenizer))  # 3 layers, intermediate size 64
    deep = make_entry({"en": "Marbrafi"}, layers=(5,))
    wide = BankEntry({"en": "Marbrafi"}, {1: LayerUpdate(torch.tensor([3, 64]), torch.ones(2))}, id="wide")
    deep_message = rf"entry '{deep.id}': layer 5 is out of range for a model with num_hidden_layers 3"
    wide_message = r"entry 'wide': layer 1: neuron index 64 is out of range for intermediate_size 64"
    with pytest.raises(ValueError, match=deep_message):
        EditableCausalLM(model, tokenizer, bank=EditBank([deep]))
    good = make_entry({"en": "Marbrafi"})
    bank = EditBank([good])
    editable = EditableCausalLM(model, tokenizer, bank=bank)  # the failed wrapper left no hooks behind
    with pytest.raises(ValueError, match=wide_message):
        editable.bank.add(wide)
    with pytest.raises(ValueError, match=deep_message):
        editable.add_entry(deep)
    with pytest.raises(ValueError, match=wide_message):
        editable.set_bank(EditBank([make_entry({"en": "Other"}), wide]))
    with pytest.raises(ValueError, match=wide_message):
        editable.bank.merge(EditBank([wide]))
    assert editable.bank is bank and [e.id for e in bank] == [good.id]
    ids = tokenizer(["The capital of Marbrafi is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        editable(ids)
