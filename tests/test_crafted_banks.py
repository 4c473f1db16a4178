"""A bank from anyone cannot break a model (issue 37): every crafted bank that once got in is now a ValueError
at load, naming what is wrong, and the model keeps its bank and keeps answering."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lafn_hf import EditableCausalLM, EditBank
from lafn_hf.hub import BANK_CONFIG_NAME, load_bank, save_bank

from .conftest import SMALL_BASE, TINY_DIR, make_entry, weights_file
from .crafting import (
    SUBJECT_PROMPT,
    UNRELATED_PROMPT,
    narrowed,
    rewrite_weights,
    routed_bank,
    routed_entry,
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
SCOPE_TENSORS = ("scope_vectors", "scope_space_means", "scope_space_scales", "scope_templates")
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
def within(seconds: float, call: Callable[[], Any], unblock: Callable[[], None] = lambda: None) -> Any:
    """``call()``'s result or exception, failing the test when it takes longer than ``seconds`` (a hang)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            outcome.append(("error", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        pytest.fail(f"still running after {seconds} s")
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


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
