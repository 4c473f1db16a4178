"""The compact bank format (3): old formats convert bit-exactly, 1M entries fit, corrupt tensors are refused."""

from __future__ import annotations

import json
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lafn_hf import BankEntry, EditBank, LayerUpdate
from lafn_hf.bank import files as bank_file
from lafn_hf.bank import format as fmt
from lafn_hf.bank.base_model import BaseModelRef
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME, FORMAT_VERSION
from lafn_hf.bank.store import load_bank, save_bank

from .conftest import SMALL_BASE, make_entry
from .crafting import rewrite_weights, write_old_bank


# -- helpers ------------------------------------------------------------------------------------------
def assert_bit_exact(loaded: EditBank, expected: EditBank) -> None:
    assert [e.id for e in loaded] == [e.id for e in expected]
    for got, want in zip(loaded, expected):
        assert got.subjects == want.subjects and got.metadata == want.metadata and got.layers == want.layers
        for layer in want.layers:
            a, b = got.updates[layer], want.updates[layer]
            assert a.neurons.dtype == b.neurons.dtype == torch.int64 and torch.equal(a.neurons, b.neurons)
            assert a.delta.dtype == b.delta.dtype == torch.float32
            assert torch.equal(a.delta.view(torch.int32), b.delta.view(torch.int32))  # the bits, -0.0 and NaN payloads


def weights_file(directory: Path) -> Path:
    found = sorted(directory.glob("lafn_bank*.safetensors"))
    assert len(found) == 1, found
    return found[0]


def tricky_bank() -> EditBank:
    """Several layers, unsorted neuron indices, an empty update, -0.0, subnormals, non-ASCII text, nested metadata."""
    special = torch.tensor([-0.0, 1e-45, -3.4e38, 3.4e38, 1.0 / 3.0])
    entries = [
        make_entry({"en": "Marbrafi", "zh": "马布拉菲"}, layers=(0, 2), seed=1),
        BankEntry({"en": "Unsorted"}, {1: LayerUpdate(torch.tensor([9, 3, 60, 0, 17]), special)},
                  {"targets": {"en": "x", "zh": "乙"}, "nested": {"list": [1, 2.5, None, "ü"]}}, id="unsorted"),
        BankEntry({"fr": "Vide"}, {0: LayerUpdate(torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
                                   2: LayerUpdate(torch.tensor([63]), torch.tensor([2.0]))}, id="with-empty"),
        BankEntry({"en": "Plain"}, {1: LayerUpdate(torch.tensor([5]), torch.tensor([-1.5]))}, id="no-metadata"),
    ]
    return EditBank(entries)


# -- migration ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_an_old_bank_is_rewritten_as_format_3_bit_exactly(tmp_path: Path, version: int) -> None:
    bank = tricky_bank()
    target = write_old_bank(tmp_path / "bank", bank, SMALL_BASE, version)
    old_weights = weights_file(target).name
    loaded, base = load_bank(target)
    assert base == SMALL_BASE
    assert_bit_exact(loaded, bank)

    save_bank(target, loaded, base)  # the migration: the next save writes format 3
    config = json.loads((target / BANK_CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION == 3
    assert weights_file(target).name == config["weights_file"] != old_weights  # the old file is gone
    assert sorted(load_file(str(weights_file(target)))) == sorted(
        ["neurons", "deltas", "layer_offsets", "segment_layers", "entry_offsets"])
    assert_bit_exact(load_bank(target)[0], bank)


def test_the_format_3_config_is_lean_one_line_per_entry(tmp_path: Path) -> None:
    save_bank(tmp_path / "bank", tricky_bank(), SMALL_BASE)
    text = (tmp_path / "bank" / BANK_CONFIG_NAME).read_text()
    config = json.loads(text)
    assert config["entries"][3] == {"id": "no-metadata", "subjects": {"en": "Plain"}}  # no layers, no empty metadata
    assert '    {"id": "unsorted", "metadata": {"nested": {"list": [1, 2.5, null, "ü"]}' in text
    assert [line[:12] for line in text.splitlines() if line.startswith("    {")] == ['    {"id": "'] * 4
    tensors = load_file(str(weights_file(tmp_path / "bank")))
    assert tensors["neurons"].dtype == torch.int32 and tensors["layer_offsets"].tolist() == [0, 32, 64, 69, 69, 70, 71]
    assert tensors["segment_layers"].tolist() == [0, 2, 1, 0, 2, 1] and tensors["entry_offsets"].tolist() == [0, 2, 3, 5, 6]


def test_empty_banks_and_int64_neuron_indices_round_trip(tmp_path: Path) -> None:
    save_bank(tmp_path / "empty", EditBank(), SMALL_BASE)
    assert len(load_bank(tmp_path / "empty")[0]) == 0
    wide = BaseModelRef("acme/wide", None, "llama", 32, 2**33, 3)
    bank = EditBank([BankEntry({"en": "Far"}, {1: LayerUpdate(torch.tensor([7, 2**31, 2**33 - 1]), torch.ones(3))})])
    save_bank(tmp_path / "wide", bank, wide)
    assert load_file(str(weights_file(tmp_path / "wide")))["neurons"].dtype == torch.int64
    assert_bit_exact(load_bank(tmp_path / "wide")[0], bank)


# -- loaded updates are views, safely -----------------------------------------------------------------
def test_loaded_updates_are_views_that_pickle_alone_and_outlive_their_file(tmp_path: Path) -> None:
    bank = EditBank([make_entry({"en": f"S{i}"}, layers=(0, 1, 2), seed=i) for i in range(50)])
    save_bank(tmp_path / "bank", bank, SMALL_BASE)
    path = weights_file(tmp_path / "bank")
    loaded, _ = load_bank(tmp_path / "bank")
    update = next(iter(loaded)).updates[0]
    assert update.delta.untyped_storage().nbytes() > 10 * update.delta.numel() * 4  # a view of the whole file
    if sys.platform == "linux":
        pointer = update.delta.data_ptr()
        mapped = [line for line in Path("/proc/self/maps").read_text().splitlines()
                  if int(line.split("-")[0], 16) <= pointer < int(line.split()[0].split("-")[1], 16)]
        assert mapped and mapped[0].endswith(path.name), mapped  # memory-mapped from the weights file
    copy = pickle.loads(pickle.dumps(update))
    assert len(pickle.dumps(update)) < 2000 and torch.equal(copy.delta, update.delta)
    assert len(pickle.dumps(loaded)) < 1.2 * len(pickle.dumps(bank))  # not 150 copies of the file
    assert_bit_exact(pickle.loads(pickle.dumps(loaded)), bank)

    save_bank(tmp_path / "bank", EditBank([make_entry({"en": "Other"})]), SMALL_BASE)  # deletes the mapped file
    assert not path.exists()
    assert_bit_exact(loaded, bank)
    loaded.add(make_entry({"en": "More"}, seed=99))  # still an ordinary bank
    save_bank(tmp_path / "bank", loaded, SMALL_BASE)
    assert len(load_bank(tmp_path / "bank")[0]) == 51


def test_windows_reads_format_3_into_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = tricky_bank()
    save_bank(tmp_path / "bank", bank, SMALL_BASE)
    monkeypatch.setattr(bank_file.sys, "platform", "win32")  # a mapped file could not be deleted by the next save
    loaded, _ = load_bank(tmp_path / "bank")
    monkeypatch.undo()
    assert_bit_exact(loaded, bank)
    update = loaded.get("unsorted").updates[1]
    assert update.delta.untyped_storage().nbytes() == 71 * 4  # a view of the deltas read into memory
    data = bytearray(weights_file(tmp_path / "bank").read_bytes())
    data[-1] ^= 1  # a flipped bit in the last delta
    weights_file(tmp_path / "bank").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted or truncated: its sha256 is"):
        load_bank(tmp_path / "bank")


def test_user_built_updates_are_still_checked() -> None:
    with pytest.raises(ValueError, match="neuron indices must be unique and >= 0"):
        LayerUpdate(torch.tensor([3, 3]), torch.ones(2))
    with pytest.raises(ValueError, match="delta contains NaN or inf"):
        LayerUpdate(torch.tensor([3]), torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="neurons must be a 1-D int64 tensor"):
        LayerUpdate(torch.tensor([3], dtype=torch.int32), torch.ones(1))


# -- corrupt tensors ----------------------------------------------------------------------------------
def _set(name: str, index: int, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t[name].__setitem__(index, value)


def _replace(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(name, value(t[name]))


# The bank: entries[0] layers 0, 1 (32 neurons each), entries[1] layer 1 (32 neurons): 3 segments, 96 neurons.
CORRUPT: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "layer_offsets decrease": (_set("layer_offsets", 2, 10), r"layer_offsets must not decrease: layer_offsets\[1\] = 32, "
                                                             r"layer_offsets\[2\] = 10"),
    "layer_offsets overrun": (_set("layer_offsets", 3, 97),
                              r"layer_offsets\[-1\] must be 96 \(the length of neurons\), got 97"),
    "layer_offsets not from 0": (_set("layer_offsets", 0, 1), r"layer_offsets\[0\] must be 0, got 1"),
    "layer_offsets short": (_replace("layer_offsets", lambda t: t[:-1]),
                            r"layer_offsets has 3 values, expected 4 \(segment_layers has 3 segments\)"),
    "layer_offsets 2-D": (_replace("layer_offsets", lambda t: t[None]),
                          r"layer_offsets must be a 1-D int64 tensor, got int64 of shape \(1, 4\)"),
    "entry_offsets repeat": (_set("entry_offsets", 1, 0), r"entry_offsets must increase \(every entry updates at least one "
                                                          r"layer\): entry_offsets\[0\] = 0, entry_offsets\[1\] = 0"),
    "entry_offsets overrun": (_set("entry_offsets", 2, 4),
                              r"entry_offsets\[-1\] must be 3 \(the length of segment_layers\)"),
    "entry_offsets count": (_replace("entry_offsets", lambda t: torch.tensor([0, 3])),
                            r"entry_offsets has 2 values, expected 3 \(2 entries are listed\)"),
    "entry_offsets float": (_replace("entry_offsets", lambda t: t.float()),
                            r"entry_offsets must be a 1-D int64 tensor, got float32"),
    "a layer out of range": (_set("segment_layers", 2, 7), r"segment_layers\[2\] = 7 \(entries\[1\]\) is out of range for "
                                                           r"base_model\.num_hidden_layers 3"),
    "a layer twice": (_set("segment_layers", 1, 0),
                      r"segment_layers must increase within an entry: entries\[0\] has layer 0 after layer 0 "
                      r"\(segment_layers\[0:2\]\)"),
    "neuron out of range": (_set("neurons", 40, 64), r"neurons\[40\] = 64 \(entries\[0\] layer 1\) is out of range for "
                                                     r"base_model\.intermediate_size 64"),
    "neuron negative": (_set("neurons", 70, -1), r"neurons\[70\] = -1 \(entries\[1\] layer 1\) is out of range"),
    "neuron repeated": (lambda t: t["neurons"].__setitem__(5, int(t["neurons"][9])),
                        r"neurons\[0:32\] \(entries\[0\] layer 0\) repeats neuron index \d+; indices must be distinct"),
    "neurons float": (_replace("neurons", lambda t: t.float()), r"neurons must be a 1-D int32 or int64 tensor, got float32"),
    "delta NaN": (_set("deltas", 95, float("nan")), r"deltas\[95\] \(entries\[1\] layer 1\) is nan; dV must be finite"),
    "delta inf": (_set("deltas", 0, float("-inf")), r"deltas\[0\] \(entries\[0\] layer 0\) is -inf"),
    "deltas short": (_replace("deltas", lambda t: t[:-1]), r"deltas has 95 values but neurons has 96"),
    "a tensor missing": (lambda t: t.pop("segment_layers"), r"tensor 'segment_layers' is missing"),
    "an extra tensor": (lambda t: t.__setitem__("a/1/delta", torch.ones(1)),
                        r"unexpected tensor 'a/1/delta' \(format 3 stores"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_tensors_raise_value_error_naming_the_field(tmp_path: Path, case: str) -> None:
    bank = EditBank([make_entry({"en": "Alpha"}, layers=(0, 1), seed=1), make_entry({"en": "Beta"}, seed=2)])
    save_bank(tmp_path / "bank", bank, SMALL_BASE)
    mutate, message = CORRUPT[case]
    rewrite_weights(tmp_path / "bank", mutate)
    prefix = r"lafn_bank-[0-9a-f]{16}\.safetensors does not match lafn_config\.json: "
    with pytest.raises(ValueError, match=prefix + message):
        load_bank(tmp_path / "bank")


def test_unsorted_distinct_neurons_load(tmp_path: Path) -> None:
    bank = EditBank([make_entry({"en": "Alpha"}, layers=(0, 1), seed=1)])
    save_bank(tmp_path / "bank", bank, SMALL_BASE)
    rewrite_weights(tmp_path / "bank", lambda t: t.__setitem__("neurons", t["neurons"].flip(0)))
    loaded = next(iter(load_bank(tmp_path / "bank")[0]))
    assert torch.equal(loaded.updates[0].neurons, bank.get(loaded.id).updates[1].neurons.flip(0))


def _entry(index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config["entries"][index].__setitem__(key, value)


OLD_CONFIGS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a stored layer is not listed": (_entry(0, "layers", [0]),
                                     r"entries\[0\]\.layers is \[0\] but the weights also store layer\(s\) \[1\]"),
    "a layer is a bool": (_entry(0, "layers", [0, True]), r"entries\[0\]\.layers must be a non-empty array of distinct int"),
    "a layer twice": (_entry(0, "layers", [0, 1, 1]), r"entries\[0\]\.layers must be a non-empty array of distinct int"),
    "a layer out of range": (_entry(1, "layers", [1, 7]),
                             r"entries\[1\]\.layers: layer 7 is out of range for base_model\.num_hidden_layers 3"),
    "layers missing": (lambda c: c["entries"][1].__delitem__("layers"), r"entries\[1\]\.layers is missing"),
    "id not allowed": (_entry(1, "id", "a b"), r"entries\[1\]\.id must be a string of 1-64 letters, digits, _ or -"),
}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", list(OLD_CONFIGS))
def test_malformed_format_1_and_2_configs_raise_value_error_naming_the_field(tmp_path: Path, case: str,
                                                                            version: int) -> None:
    bank = EditBank([make_entry({"en": "Alpha"}, layers=(0, 1), seed=1), make_entry({"en": "Beta"}, seed=2)])
    write_old_bank(tmp_path / "bank", bank, SMALL_BASE, version)
    config = json.loads((tmp_path / "bank" / BANK_CONFIG_NAME).read_text())
    mutate, message = OLD_CONFIGS[case]
    mutate(config)
    (tmp_path / "bank" / BANK_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_bank(tmp_path / "bank")


def test_malformed_format_3_entries_raise_value_error_naming_the_field(tmp_path: Path) -> None:
    save_bank(tmp_path / "bank", tricky_bank(), SMALL_BASE)
    path = tmp_path / "bank" / BANK_CONFIG_NAME
    config = json.loads(path.read_text())
    for index, key, value, message in [
            (2, "subjects", {"en": ""}, r"entries\[2\]\.subjects must be an object mapping languages to non-empty"),
            (3, "id", "x\ny", r"entries\[3\]\.id must be a string of 1-64"),
            (1, "metadata", [1], r"entries\[1\]\.metadata must be an object, got array"),
            (3, "id", "unsorted", r"entries\[3\]\.id 'unsorted' is already used by entries\[1\]")]:
        broken = json.loads(json.dumps(config))
        broken["entries"][index][key] = value
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            load_bank(tmp_path / "bank")


# -- size and speed -----------------------------------------------------------------------------------
@pytest.mark.slow  # about 20 s on a busy 2-core machine (save 5 s, load 9 s, building and comparing the rest)
def test_a_million_entries_save_and_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    count = 1_000_000
    neurons = (torch.arange(count) * 7 % 56).repeat_interleave(4) + torch.arange(0, 8, 2).repeat(count)  # distinct, sorted
    deltas = torch.randn(count * 4, generator=torch.Generator().manual_seed(0))
    n_views, d_views = neurons.split(4), deltas.split(4)
    # Built through the checked-in-bulk path (1M validated LayerUpdates alone would take ~20 s to construct).
    with fmt.paused_gc():
        entries = [BankEntry._from_checked({"en": f"Subject {i}"},
                                           {i % 3: LayerUpdate._from_checked(n_views[i], d_views[i])}, {}, f"e{i}")
                   for i in range(count)]
    bank = EditBank._from_checked(entries)

    started = time.perf_counter()
    save_bank(tmp_path / "bank", bank, SMALL_BASE)
    saved = time.perf_counter() - started
    loaded, _ = load_bank(tmp_path / "bank")
    load_time = time.perf_counter() - started - saved
    size = weights_file(tmp_path / "bank").stat().st_size + (tmp_path / "bank" / BANK_CONFIG_NAME).stat().st_size
    with capsys.disabled():
        print(f"\n1M entries: save {saved:.1f} s, load {load_time:.1f} s, {size / 1e6:.0f} MB")

    assert len(loaded) == count
    tensors, rows = fmt.encode(loaded)
    assert torch.equal(tensors["neurons"].long(), neurons) and torch.equal(tensors["deltas"].view(torch.int32),
                                                                           deltas.view(torch.int32))
    assert tensors["segment_layers"].tolist() == [i % 3 for i in range(count)]
    assert rows == [{"id": f"e{i}", "subjects": {"en": f"Subject {i}"}} for i in range(count)]
    last = loaded.get(f"e{count - 1}")
    assert last.layers == ((count - 1) % 3,) and torch.equal(last.updates[last.layers[0]].neurons, neurons[-4:])
    assert "... and 999000 more" in (tmp_path / "bank" / "README.md").read_text()


def test_ten_thousand_gemma_sized_entries_load_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = BaseModelRef("google/gemma-3-270m", None, "gemma3_text", 640, 2048, 18)
    generator = torch.Generator().manual_seed(0)
    neurons = torch.arange(300) * 6 + torch.randint(0, 6, (10_000 * 3, 1), generator=generator)  # (30000, 300) sorted
    deltas = torch.randn(10_000 * 3, 300, generator=generator)
    layers = (5, 6, 7)
    bank = EditBank([BankEntry({"en": f"Subject {i}", "zh": f"主题{i}"},
                               {layer: LayerUpdate(neurons[3 * i + k], deltas[3 * i + k]) for k, layer in enumerate(layers)},
                               {"targets": {"en": "x"}}) for i in range(10_000)])
    save_bank(tmp_path / "bank", bank, base)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        loaded, _ = load_bank(tmp_path / "bank")
        times.append(time.perf_counter() - started)
    with capsys.disabled():
        print(f"\n10k entries x 3 layers x 300 neurons: load {min(times):.2f} s (benchmarks/bank_io.py: the real number)")
    assert min(times) < 2.0  # 0.5 s on a quiet machine; loose for busy CI
    assert_bit_exact(loaded, bank)
