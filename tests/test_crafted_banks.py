"""A bank from anyone cannot break a model (issue 37): every crafted bank that once got in is now a ValueError
at load, naming what is wrong, and the model keeps its bank and keeps answering."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lafn_hf import BankEntry, EditableCausalLM, EditBank, EditGroup, LanguageEdit, LayerUpdate
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME
from lafn_hf.bank.store import load_bank, save_bank
from lafn_hf.cli import main
from lafn_hf.routing.compiled import CompiledBank
from lafn_hf.routing.matcher import SubjectMatcher
from lafn_hf.text import MAX_FORM_LENGTH

from .conftest import SMALL_BASE, TINY_DIR, make_entry, weights_file
from .crafting import (
    SUBJECT_PROMPT,
    UNRELATED_PROMPT,
    narrowed,
    rewrite_config,
    rewrite_weights,
    routed_bank,
    routed_entry,
    within,
    write_old_bank,
)

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform == "win32", reason="needs FIFOs")


@pytest.fixture()
def tiny(tokenizer: Any) -> EditableCausalLM:
    """The tiny trained model (hidden size 64, 4 layers, intermediate size 256) with a one-entry bank."""
    editable = EditableCausalLM(AutoModelForCausalLM.from_pretrained(TINY_DIR).eval(), tokenizer)
    editable.add_entry(make_entry({"en": "Lunvalfiland"}, size=256, seed=5))
    return editable


def finite_answers(editable: EditableCausalLM) -> bool:
    """Finite logits on a prompt naming a bank subject and on an unrelated one."""
    for prompt in (SUBJECT_PROMPT, UNRELATED_PROMPT):
        ids = editable.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            if not bool(torch.isfinite(editable(ids).logits).all()):
                return False
    return True


def refused_everywhere(editable: EditableCausalLM, directory: Path, message: str) -> None:
    """``load_bank``, ``from_pretrained`` and ``EditableCausalLM.load_bank`` all raise ``message``; the model keeps
    its bank and answers."""
    kept = editable.bank
    with pytest.raises(ValueError, match=message):
        load_bank(directory)
    with pytest.raises(ValueError, match=message):
        EditableCausalLM.from_pretrained(directory)
    with pytest.raises(ValueError, match=message):
        editable.load_bank(directory)
    assert editable.bank is kept and finite_answers(editable)


# -- item 1: routing tensors that do not fit the model ------------------------------------------------
KEY_TENSORS = ("key_vectors", "space_means", "space_scales")
SCOPE_TENSORS = ("scope_vectors", "scope_space_means", "scope_space_scales", "scope_templates", "scope_bases")
ROUTING: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "routing keys 63 wide": (narrowed(KEY_TENSORS, 63), r"space_means has 63 columns, base_model\.hidden_size is 64"),
    "question scopes 63 wide": (narrowed(SCOPE_TENSORS, 63),
                                r"scope_space_means has 63 columns, base_model\.hidden_size is 64"),
    "key vectors 1-D": (lambda t: t.__setitem__("key_vectors", t["key_vectors"][0]),
                        r"key_vectors must be 2-D \(rows of base_model\.hidden_size 64\), got shape \(64,\)"),
    "a key space past the last layer": (lambda t: t["space_layers"].fill_(9),
                                        r"space_layers\[0\] = 9 is out of range for base_model\.num_hidden_layers 4"),
    "a NaN threshold": (lambda t: t["key_thresholds"].fill_(float("nan")),
                        r"routing key threshold must be a cosine in \[-1, 1\], got nan"),
}


@pytest.mark.parametrize("case", list(ROUTING))
def test_routing_tensors_that_do_not_fit_the_model_are_refused(tiny: EditableCausalLM, tmp_path: Path,
                                                               case: str) -> None:
    save_bank(tmp_path / "bank", routed_bank(64), tiny.base_ref)
    mutate, message = ROUTING[case]
    rewrite_weights(tmp_path / "bank", mutate)
    refused_everywhere(tiny, tmp_path / "bank", message)


def test_routing_keys_and_scopes_of_another_width_are_refused_in_memory(tiny: EditableCausalLM) -> None:
    kept = tiny.bank
    message = r"entry 'e0': its routing key has size 63, the model's hidden_size is 64"
    with pytest.raises(ValueError, match=message):
        tiny.set_bank(EditBank([routed_entry(63)]))
    with pytest.raises(ValueError, match=message):
        tiny.add_entry(routed_entry(63))
    scoped = routed_entry(63)
    scoped = type(scoped)(scoped.subjects, scoped.updates, id="e0", scope=scoped.scope)
    with pytest.raises(ValueError, match=r"entry 'e0': its question scope has size 63, the model's hidden_size is 64"):
        tiny.bank.add(scoped)
    assert tiny.bank is kept and len(kept) == 1 and finite_answers(tiny)
    tiny.add_entry(routed_entry(64))  # the right width loads and answers
    assert finite_answers(tiny)


# -- item 8: metadata must be strict JSON -------------------------------------------------------------
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_a_nan_or_infinity_literal_in_the_config_is_refused(tiny: EditableCausalLM, tmp_path: Path, literal: str) -> None:
    save_bank(tmp_path / "bank", EditBank([make_entry({"en": "Marbrafi"}, size=256)]), tiny.base_ref)
    path = tmp_path / "bank" / BANK_CONFIG_NAME
    path.write_text(path.read_text().replace('"targets"', f'"score": {literal}, "targets"'))
    refused_everywhere(tiny, tmp_path / "bank", rf"lafn_config\.json is not strict JSON: it holds {literal}")


def test_a_bank_whose_metadata_is_not_strict_json_is_not_saved(tmp_path: Path) -> None:
    entry = make_entry({"en": "Marbrafi"})
    entry.metadata["score"] = float("nan")
    with pytest.raises(ValueError, match=rf"entry '{entry.id}': its metadata is not strict JSON \(NaN or infinity\)"):
        save_bank(tmp_path / "bank", EditBank([entry]), SMALL_BASE)
    assert not (tmp_path / "bank" / BANK_CONFIG_NAME).exists()


# -- item 3: files that are not regular files, or longer than their header says ----------------------------
def open_fifo_for_writing(path: Path) -> None:
    """Let a reader blocked opening the FIFO ``path`` go on (it then reads end of file)."""
    with suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@needs_fifo
@pytest.mark.parametrize("version", [1, 3])
def test_a_fifo_as_the_weights_file_is_refused_at_once(tiny: EditableCausalLM, tmp_path: Path, version: int) -> None:
    directory = tmp_path / "bank"
    if version == 3:
        save_bank(directory, EditBank([make_entry({"en": "Marbrafi"}, size=256)]), tiny.base_ref)
    else:
        write_old_bank(directory, EditBank([make_entry({"en": "Marbrafi"}, size=256)]), tiny.base_ref, 1)
    fifo = weights_file(directory)
    fifo.unlink()
    os.mkfifo(fifo)
    message = rf"{fifo.name} is not a regular file \(a FIFO\)"
    for load in (lambda: load_bank(directory), lambda: tiny.load_bank(directory)):
        with pytest.raises(ValueError, match=message):
            within(1.0, load, lambda: open_fifo_for_writing(fifo))
    assert finite_answers(tiny)


@needs_fifo
def test_a_device_or_a_fifo_in_place_of_a_bank_file_is_refused_at_once(tiny: EditableCausalLM, tmp_path: Path) -> None:
    directory = tmp_path / "bank"
    save_bank(directory, EditBank([make_entry({"en": "Marbrafi"}, size=256)]), tiny.base_ref)
    weights = weights_file(directory)
    weights.unlink()
    weights.symlink_to("/dev/zero")  # endless: hashing it never ends
    with pytest.raises(ValueError, match=rf"{weights.name} is not a regular file \(a character device\)"):
        within(1.0, lambda: load_bank(directory))
    config = directory / BANK_CONFIG_NAME
    config.unlink()
    os.mkfifo(config)
    with pytest.raises(ValueError, match=rf"{BANK_CONFIG_NAME} is not a regular file \(a FIFO\)"):
        within(1.0, lambda: EditableCausalLM.from_pretrained(directory), lambda: open_fifo_for_writing(config))


def test_a_weights_file_longer_than_its_header_declares_is_refused_before_hashing(tmp_path: Path) -> None:
    save_bank(tmp_path / "bank", EditBank([make_entry({"en": "Marbrafi"})]), SMALL_BASE)
    weights = weights_file(tmp_path / "bank")
    size = weights.stat().st_size
    with weights.open("ab") as handle:
        handle.truncate(size + 2**40)  # a sparse terabyte: hashing it would take hours
    message = rf"{weights.name} is corrupted or truncated: it has {size + 2**40} bytes, its header declares {size}"
    with pytest.raises(ValueError, match=message):
        within(1.0, lambda: load_bank(tmp_path / "bank"))
    with weights.open("r+b") as handle:
        handle.write((2**62).to_bytes(8, "little"))  # a header length beyond the file
    with pytest.raises(ValueError, match=rf"{weights.name} is corrupted or truncated: its header length"):
        within(1.0, lambda: load_bank(tmp_path / "bank"))


# -- items 2 and 5: one rule for subjects and aliases, however an entry is made -------------------------
COMMON: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "subject 'the'": (lambda entry: entry.__setitem__("subjects", {"en": "the"}),
                      r"entries\[0\]\.subjects\.en is refused: it is one of the most frequent function words of 'en'"),
    "subject '的'": (lambda entry: entry.__setitem__("subjects", {"zh": "的"}),
                    r"entries\[0\]\.subjects\.zh is refused: it is one of the most frequent function words of 'zh'"),
    "alias 'a'": (lambda entry: entry.__setitem__("aliases", ["Marbrafi City", "a"]),
                  r"entries\[0\]\.aliases\[1\] is refused: it has fewer than 2 letters or digits \(one character .*\)"),
    "alias 'die'": (lambda entry: entry.__setitem__("aliases", ["die"]),
                    r"entries\[0\]\.aliases\[0\] is refused: it is one of the most frequent function words of 'de'"),
}


@pytest.mark.parametrize("case", list(COMMON))
def test_function_word_subjects_and_aliases_are_refused_at_load_unless_allowed(tiny: EditableCausalLM, tmp_path: Path,
                                                                              case: str) -> None:
    save_bank(tmp_path / "bank", EditBank([make_entry({"en": "Marbrafi"}, size=256)]), tiny.base_ref)
    mutate, message = COMMON[case]
    rewrite_config(tmp_path / "bank", lambda config: mutate(config["entries"][0]))
    refused_everywhere(tiny, tmp_path / "bank", message + r"; a bank subject or alias edits every prompt it occurs in, "
                                                          r"load with allow_common=True to accept it")
    tiny.load_bank(tmp_path / "bank", allow_common=True)  # the caller's opt-in, as for edit() and add_aliases
    assert len(load_bank(tmp_path / "bank", allow_common=True)[0]) == 1 and finite_answers(tiny)


FORMS = ["the", "的", "a", "die", "Die Antwoord", "Marbrafi", "x" * 257]


def test_edit_add_aliases_and_the_loader_refuse_the_same_forms(tiny: EditableCausalLM, tmp_path: Path) -> None:
    """Every way an alias enters: ``LanguageEdit``/``EditGroup`` (``edit()``), ``add_aliases`` and the loader."""
    entry_id = next(iter(tiny.bank)).id
    verdicts: dict[str, list[bool]] = {}
    for form in FORMS:
        refused = []
        try:
            EditGroup({"en": LanguageEdit("The capital of Marbrafi is", "Marbrafi", "Paris", aliases=(form,))})
            refused.append(False)
        except ValueError:
            refused.append(True)
        try:
            tiny.add_aliases(entry_id, [form])
            refused.append(False)
        except ValueError:
            refused.append(True)
        directory = tmp_path / f"form{len(verdicts)}"
        save_bank(directory, EditBank([make_entry({"en": "Marbrafi"}, size=256)]), tiny.base_ref)
        rewrite_config(directory, lambda config, form=form: config["entries"][0].__setitem__("aliases", [form]))
        try:
            load_bank(directory)
            refused.append(False)
        except ValueError:
            refused.append(True)
        verdicts[form] = refused
    assert verdicts == {form: [form not in ("Die Antwoord", "Marbrafi")] * 3 for form in FORMS}


LONG = "Marbrafi " * 3000  # 27,000 characters: the matcher of the day took 3-12 s to build, at the next forward


def test_a_subject_or_alias_longer_than_the_limit_is_refused_wherever_it_enters(tiny: EditableCausalLM,
                                                                               tmp_path: Path) -> None:
    limit = rf"has {len(LONG)} characters; subjects and aliases may have at most {MAX_FORM_LENGTH}"
    with pytest.raises(ValueError, match=rf"entry 'long': subject for 'en' {limit}"):
        BankEntry({"en": LONG}, make_entry({"en": "x"}).updates, id="long")
    with pytest.raises(ValueError, match=rf"subject {limit}"):
        LanguageEdit(f"The capital of {LONG} is", LONG, "Paris")
    with pytest.raises(ValueError, match=rf"entry '.*': aliases\[0\] {limit}"):
        tiny.add_aliases(next(iter(tiny.bank)).id, [LONG], allow_common=True)
    for where, mutate in ((r"entries\[0\]\.subjects\.en", lambda entry: entry.__setitem__("subjects", {"en": LONG})),
                          (r"entries\[0\]\.aliases\[0\]", lambda entry: entry.__setitem__("aliases", [LONG]))):
        directory = tmp_path / f"bank-{len(where)}"
        save_bank(directory, EditBank([make_entry({"en": "Marbrafi"}, size=256)]), tiny.base_ref)
        rewrite_config(directory, lambda config, mutate=mutate: mutate(config["entries"][0]))
        refused_everywhere(tiny, directory, rf"{where} {limit}")
        with pytest.raises(ValueError, match=rf"{where} {limit}"):
            load_bank(directory, allow_common=True)  # not a matter of opting in
    assert MAX_FORM_LENGTH >= 200  # the longest subjects of MzsRE have about 100 characters


def test_the_matcher_is_built_when_the_bank_is_set_and_in_linear_time(tiny: EditableCausalLM,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.perf_counter()
    SubjectMatcher([LONG], inflected=[LONG], spellings=True)  # the matcher itself has no limit: built in linear time
    assert time.perf_counter() - started < 0.5
    builds: list[int] = []
    real_build = CompiledBank.build.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(CompiledBank, "build", classmethod(lambda cls, *args: builds.append(1) or real_build(cls, *args)))
    forms = {lang: f"{word} {'Marbrafi ' * 27}"[:MAX_FORM_LENGTH] for lang, word in (("en", "Eins"), ("ru", "Два"))}
    bank = EditBank([make_entry({lang: f"{i} {form}" for lang, form in forms.items()}, size=256, seed=i)
                     for i in range(50)])
    tiny.set_bank(bank)
    assert builds == [1]  # at set_bank, not at the next forward
    started = time.perf_counter()
    assert finite_answers(tiny)
    assert builds == [1] and time.perf_counter() - started < 1.0


# -- item 4: dV that the model's dtype cannot hold ----------------------------------------------------
def half_model(tokenizer: Any) -> EditableCausalLM:
    return EditableCausalLM(AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float16).eval(), tokenizer)


@pytest.mark.parametrize("value", [1e6, 1e30, 3.4e38])
def test_a_dv_float16_cannot_hold_is_refused_on_a_float16_model(tokenizer: Any, tmp_path: Path, value: float) -> None:
    half = half_model(tokenizer)
    half.add_entry(make_entry({"en": "Lunvalfiland"}, size=256, seed=5))
    save_bank(tmp_path / "bank", EditBank([make_entry({"en": "Marbrafi"}, size=256)]), half.base_ref)
    rewrite_weights(tmp_path / "bank", lambda t: t["deltas"].__setitem__(3, value))
    shown = re.escape(f"{value:.3g}")
    message = (rf"entry 'edit-[0-9a-f]+' layer 1: dV \(largest \|dV\| {shown}\) can change an output of down_proj by "
               rf"up to [0-9.e+]+, more than float16 holds with headroom \(16376\)")
    kept = half.bank
    with pytest.raises(ValueError, match=message):
        half.load_bank(tmp_path / "bank")
    with pytest.raises(ValueError, match=message):
        EditableCausalLM.from_pretrained(tmp_path / "bank", dtype=torch.float16)
    assert half.bank is kept and finite_answers(half)
    if value < 1e30:  # float32 holds it: the same bank loads there and answers
        editable = EditableCausalLM.from_pretrained(tmp_path / "bank")
        assert finite_answers(editable)


def test_a_routing_space_float16_cannot_hold_is_refused_on_a_float16_model(tokenizer: Any, tmp_path: Path) -> None:
    half = half_model(tokenizer)
    save_bank(tmp_path / "bank", routed_bank(64), half.base_ref)
    rewrite_weights(tmp_path / "bank", lambda t: t["space_means"].__setitem__((0, 5), 1e6))
    with pytest.raises(ValueError, match=r"entry 'e0': its routing key's space mean reaches 1e\+06, more than float16 "
                                         r"holds \(65504\)"):
        half.load_bank(tmp_path / "bank")
    assert finite_answers(EditableCausalLM.from_pretrained(tmp_path / "bank"))  # float32 holds it


def test_casting_a_model_after_its_bank_was_set_checks_the_bank_again(tiny: EditableCausalLM) -> None:
    entry = make_entry({"en": "Marbrafi"}, size=256)
    update = entry.updates[1]
    huge = BankEntry(entry.subjects, {1: LayerUpdate(update.neurons, update.delta * 0 + 1e6)}, id="huge")
    tiny.add_entry(huge)  # float32 holds it
    assert finite_answers(tiny)
    message = r"entry 'huge' layer 1: dV \(largest \|dV\| 1e\+06\) .* more than float16 holds"
    with pytest.raises(ValueError, match=message):
        tiny.half()  # refused before anything is cast
    assert next(tiny.parameters()).dtype == torch.float32 and finite_answers(tiny)
    tiny.model.to(torch.float16)  # past the wrapper: the next forward refuses instead of answering NaN
    with pytest.raises(ValueError, match=message):
        finite_answers(tiny)
    tiny.remove_edit("huge")
    assert finite_answers(tiny)
    with pytest.raises(ValueError, match=message):
        tiny.add_entry(huge)


def test_a_users_own_common_subject_bank_can_still_be_shown_and_pushed(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``allow_common_subject`` edits are the user's choice: ``lafn info`` and ``lafn push`` read such a bank."""
    save_bank(tmp_path / "bank", EditBank([make_entry({"en": "the"})]), SMALL_BASE)
    assert main(["info", str(tmp_path / "bank")]) == 0 and "{'en': 'the'}" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "bank"), "me/bank", "--dry-run"]) == 0
