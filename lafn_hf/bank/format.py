"""The tensors of an edit bank's weights file: how a bank becomes safetensors tensors and back.

Format 3 (the one written) stores a whole bank in five tensors, whatever its size. With E entries
(listed in this order in ``lafn_config.json``), S (entry, layer) segments and N neuron indices::

    neurons         (N,)    int32    every update's neuron indices, entry by entry, layer by layer
                                     (int64 only when an index does not fit int32)
    deltas          (N,)    float32  the matching dV
    layer_offsets   (S+1,)  int64    segment s is neurons[layer_offsets[s]:layer_offsets[s+1]]
    segment_layers  (S,)    int32    the layer segment s updates (increasing within an entry)
    entry_offsets   (E+1,)  int64    entry e owns segments entry_offsets[e]:entry_offsets[e+1] (at least one)

Formats 1 and 2 store two tensors per entry and layer (``{id}/{layer}/neurons`` int64, ``{id}/{layer}/delta``
float32) and list each entry's layers in the config; safetensors' header limit (100 MB) stops them at about
176k entries x 3 layers, and loading builds and checks every tensor one by one.

Loading format 3 reads the file once to check its sha256, then memory-maps it with ``safetensors.safe_open``
(private mapping: writes to a loaded tensor never reach the file) and checks the concatenated tensors once,
vectorised: offsets start at 0, end at the length they index and never decrease; layers and neuron indices
are in range for the base model; neuron indices are distinct within a segment; deltas are finite. Every
``LayerUpdate`` is then built without re-checking, from views: ``delta`` is a slice of the mapped ``deltas``
(read lazily from the page cache, never copied), ``neurons`` a slice of one int64 copy of ``neurons`` made
in memory (``LayerUpdate`` holds int64; int32 on disk halves the file); the offsets and layers are read into
Python lists. So a loaded bank's updates share two tensors, which stay alive while any of its updates is
referenced; pickling a ``LayerUpdate`` copies only its own values. Formats 1 and 2, and every format on
Windows (where a mapped file could not be deleted by the next save), are read into memory instead. lafn-hf
never modifies a weights file in place (a save writes a new file and renames it), which makes mapping safe;
changing one by other means while a bank loaded from it is in use changes or breaks that bank.
"""

from __future__ import annotations

import gc
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..text import nfc
from .entries import _ENTRY_ID, BankEntry, EditBank, LayerUpdate
from .routing_tensors import (
    OPTIONAL_TENSORS,
    check_model_shapes,
    decode_routing,
    decode_scopes,
    encode_routing,
    encode_scopes,
)

NEURONS, DELTAS, LAYER_OFFSETS, SEGMENT_LAYERS, ENTRY_OFFSETS = (
    "neurons", "deltas", "layer_offsets", "segment_layers", "entry_offsets")
_DTYPES = {NEURONS: (torch.int32, torch.int64), DELTAS: (torch.float32,), LAYER_OFFSETS: (torch.int64,),
           SEGMENT_LAYERS: (torch.int32,), ENTRY_OFFSETS: (torch.int64,)}
_INT32_MAX = 2**31 - 1
_TENSOR_KEY = re.compile(r"^([^/]+)/(\d+)/(neurons|delta)$")  # formats 1 and 2


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection meanwhile: building a million objects otherwise triggers collections that
    traverse them all, again and again (3x slower)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- the config's entries ----------------------------------------------------------------------------
def config_json(header: dict[str, Any], entries: list[dict[str, Any]]) -> bytes:
    """``header`` as indented JSON, then ``entries`` one line each: readable, and quick to write for 1M entries."""
    head = json.dumps(header, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)  # "{\n  ...\n}"
    encoder = json.JSONEncoder(ensure_ascii=False, sort_keys=True, allow_nan=False)
    try:
        lines = list(map(encoder.encode, entries))
    except ValueError:  # NaN or infinity, which strict JSON (and the loader) refuse
        bad = next(row for row in entries if not _strict(encoder, row))
        raise ValueError(f"entry {bad['id']!r}: its metadata is not strict JSON (NaN or infinity); nothing was "
                         "saved") from None
    rows = "[\n    " + ",\n    ".join(lines) + "\n  ]" if entries else "[]"
    return f'{head[:-2]},\n  "entries": {rows}\n}}\n'.encode()


def _strict(encoder: json.JSONEncoder, row: dict[str, Any]) -> bool:
    try:
        encoder.encode(row)
    except ValueError:
        return False
    return True


def is_plain_entry(raw: Any) -> bool:
    """Whether ``raw`` is a format-3 config entry as lafn-hf writes it (id, non-empty subjects, optional metadata
    object), checked fast; ``hub`` checks anything else field by field, naming what is wrong."""
    if type(raw) is not dict:
        return False
    entry_id, subjects = raw.get("id"), raw.get("subjects")
    if type(entry_id) is not str or _ENTRY_ID.match(entry_id) is None or type(subjects) is not dict or not subjects:
        return False
    try:
        return (all(map(str.strip, subjects.values())) and ("metadata" not in raw or type(raw["metadata"]) is dict)
                and ("aliases" not in raw or _plain_aliases(raw["aliases"])))
    except TypeError:  # a subject that is not a string
        return False


def _plain_aliases(aliases: Any) -> bool:
    """A list of distinct non-empty NFC strings (their length is checked with the subjects', ``bank_checks``)."""
    return (type(aliases) is list and all(type(alias) is str and alias.strip() for alias in aliases)
            and len(set(aliases)) == len(aliases) and all(unicodedata.is_normalized("NFC", alias) for alias in aliases))


# -- format 3 ----------------------------------------------------------------------------------------
def encode(bank: EditBank) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(the five format-3 tensors, the config's ``entries``: id, subjects and metadata when not empty)."""
    neurons: list[torch.Tensor] = []
    deltas: list[torch.Tensor] = []
    layers: list[int] = []
    segments = [0]  # layer_offsets
    firsts = [0]  # entry_offsets
    rows: list[dict[str, Any]] = []
    for entry in bank:
        for layer, update in sorted(entry.updates.items()):
            neurons.append(update.neurons)
            deltas.append(update.delta)
            layers.append(layer)
            segments.append(segments[-1] + update.neurons.numel())
        firsts.append(len(layers))
        row: dict[str, Any] = {"id": entry.id, "subjects": entry.subjects}
        if entry.metadata:
            row["metadata"] = entry.metadata
        if entry.aliases:
            row["aliases"] = list(entry.aliases)
        rows.append(row)
    flat = _cat(neurons, torch.int64)
    top = int(flat.max()) if flat.numel() else 0
    tensors = {
        NEURONS: flat.to(torch.int32) if top <= _INT32_MAX else flat,
        DELTAS: _cat(deltas, torch.float32),
        LAYER_OFFSETS: torch.tensor(segments, dtype=torch.int64),
        SEGMENT_LAYERS: torch.tensor(layers, dtype=torch.int32),
        ENTRY_OFFSETS: torch.tensor(firsts, dtype=torch.int64),
    }
    tensors.update(encode_routing(bank))
    tensors.update(encode_scopes(bank))
    return {name: tensor.contiguous() for name, tensor in tensors.items()}, rows


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=dtype)
    try:
        return torch.cat(parts).detach().cpu()
    except RuntimeError:  # updates on different devices
        return torch.cat([part.detach().cpu() for part in parts])


def decode(entries: Sequence[dict[str, Any]], tensors: dict[str, torch.Tensor], num_hidden_layers: int,
           intermediate_size: int, hidden_size: int) -> EditBank:
    """The bank of ``entries`` (checked config entries: id, subjects, metadata) and format-3 ``tensors``; any
    inconsistency is a ``ValueError`` naming the tensor (and the entry and layer where there is one)."""
    unexpected = sorted(set(tensors) - set(_DTYPES) - set(OPTIONAL_TENSORS))
    if unexpected:
        raise ValueError(f"unexpected tensor {unexpected[0]!r} (format 3 stores {', '.join(_DTYPES)}, and for "
                         f"routing and question scopes {', '.join(OPTIONAL_TENSORS)})")
    check_model_shapes(tensors, hidden_size, num_hidden_layers)
    keys = decode_routing(tensors, len(entries))
    scopes = decode_scopes(tensors, len(entries))
    neurons, deltas, layer_offsets, segment_layers, entry_offsets = (_vector(tensors, name) for name in _DTYPES)
    count, segments = neurons.numel(), segment_layers.numel()
    if deltas.numel() != count:
        raise ValueError(f"{DELTAS} has {deltas.numel()} values but {NEURONS} has {count}")
    _check_offsets(layer_offsets, LAYER_OFFSETS, segments, f"{SEGMENT_LAYERS} has {segments} segments",
                   count, NEURONS, strict=False)
    _check_offsets(entry_offsets, ENTRY_OFFSETS, len(entries), f"{len(entries)} entries are listed",
                   segments, SEGMENT_LAYERS, strict=True)
    where = _Locator(entry_offsets, layer_offsets, segment_layers)
    _check_layers(segment_layers, entry_offsets, num_hidden_layers, where)
    _check_neurons(neurons, layer_offsets, intermediate_size, where)
    if not bool(torch.isfinite(deltas.sum())) and not bool(torch.isfinite(deltas).all()):  # a finite sum: all finite
        first = int((~torch.isfinite(deltas)).nonzero()[0])
        raise ValueError(f"{DELTAS}[{first}] ({where.neuron(first)}) is {float(deltas[first])}; dV must be finite")

    counts = layer_offsets.diff().tolist()
    neuron_views = neurons.to(torch.int64).split(counts)  # one copy when stored as int32, then views
    delta_views = deltas.split(counts)
    layers = segment_layers.tolist()
    bounds = entry_offsets.tolist()
    normalized = _all_nfc(entries)
    update, entry = LayerUpdate._from_checked, BankEntry._from_checked
    built = []
    for index, (raw, start, stop) in enumerate(zip(entries, bounds, bounds[1:])):
        if stop == start + 1:  # the usual single layer, without a comprehension
            updates = {layers[start]: update(neuron_views[start], delta_views[start])}
        else:
            updates = {layers[s]: update(neuron_views[s], delta_views[s]) for s in range(start, stop)}
        subjects = raw["subjects"] if normalized else {lang: nfc(subject) for lang, subject in raw["subjects"].items()}
        aliases = tuple(raw["aliases"]) if "aliases" in raw else ()
        key = keys.get(index)
        if key is not None and key.layer > layers[start]:
            raise ValueError(f"entries[{index}]: routing key layer {key.layer} is above its first edited layer")
        scope = scopes.get(index)
        if scope is not None and scope.layer > layers[start]:
            raise ValueError(f"entries[{index}]: question scope layer {scope.layer} is above its first edited layer")
        built.append(entry(subjects, updates, raw["metadata"], raw["id"], aliases, key, scope))
    bank = EditBank._from_checked(built)
    return bank


def _all_nfc(entries: Sequence[dict[str, Any]]) -> bool:
    """Whether every subject is NFC already, in one pass: NUL is a starter that composes with nothing, so NFC
    never crosses it and the joined text is NFC exactly when every piece is."""
    return unicodedata.is_normalized("NFC", "\0".join([s for raw in entries for s in raw["subjects"].values()]))


def _vector(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing")
    tensor, dtypes = tensors[name], _DTYPES[name]
    if tensor.dim() != 1 or tensor.dtype not in dtypes:
        expected = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise ValueError(f"{name} must be a 1-D {expected} tensor, got {str(tensor.dtype).removeprefix('torch.')} "
                         f"of shape {tuple(tensor.shape)}")
    return tensor


def _check_offsets(offsets: torch.Tensor, name: str, parts: int, why: str, total: int, indexed: str,
                   strict: bool) -> None:
    """``offsets`` has ``parts + 1`` values from 0 to ``total`` that never decrease (increase when ``strict``)."""
    if offsets.numel() != parts + 1:
        raise ValueError(f"{name} has {offsets.numel()} values, expected {parts + 1} ({why})")
    if int(offsets[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(offsets[0])}")
    if int(offsets[-1]) != total:
        raise ValueError(f"{name}[-1] must be {total} (the length of {indexed}), got {int(offsets[-1])}")
    steps = offsets.diff()
    bad = (steps <= 0) if strict else (steps < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        rule = "increase (every entry updates at least one layer)" if strict else "not decrease"
        raise ValueError(f"{name} must {rule}: {name}[{i}] = {int(offsets[i])}, {name}[{i + 1}] = {int(offsets[i + 1])}")


class _Locator:
    """Names the entry and layer of a segment or of a position in ``neurons`` (for error messages)."""

    def __init__(self, entry_offsets: torch.Tensor, layer_offsets: torch.Tensor, segment_layers: torch.Tensor) -> None:
        self.entry_offsets, self.layer_offsets, self.segment_layers = entry_offsets, layer_offsets, segment_layers

    def entry(self, segment: int) -> str:
        return f"entries[{int(torch.searchsorted(self.entry_offsets, segment, right=True)) - 1}]"

    def segment(self, segment: int) -> str:
        return f"{self.entry(segment)} layer {int(self.segment_layers[segment])}"

    def segment_of(self, position: int) -> int:
        return int(torch.searchsorted(self.layer_offsets, position, right=True)) - 1

    def neuron(self, position: int) -> str:
        return self.segment(self.segment_of(position))


def _within_parts(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """For each i, whether values[i] < values[i + 1] or the two lie in different parts (offsets bound parts)."""
    increasing = values[1:] > values[:-1]
    starts = offsets[1:-1]
    starts = starts[(starts > 0) & (starts < values.numel())]
    increasing[starts - 1] = True
    return increasing


def _check_layers(layers: torch.Tensor, entry_offsets: torch.Tensor, num_hidden_layers: int, where: _Locator) -> None:
    if not layers.numel():
        return
    outside = (layers < 0) | (layers >= num_hidden_layers)
    if bool(outside.any()):
        s = int(outside.nonzero()[0])
        raise ValueError(f"{SEGMENT_LAYERS}[{s}] = {int(layers[s])} ({where.entry(s)}) is out of "
                         f"range for base_model.num_hidden_layers {num_hidden_layers}")
    ordered = _within_parts(layers, entry_offsets)
    if not bool(ordered.all()):
        s = int((~ordered).nonzero()[0]) + 1
        raise ValueError(f"{SEGMENT_LAYERS} must increase within an entry: {where.entry(s)} has layer {int(layers[s])} "
                         f"after layer {int(layers[s - 1])} ({SEGMENT_LAYERS}[{s - 1}:{s + 1}])")


def _check_neurons(neurons: torch.Tensor, layer_offsets: torch.Tensor, intermediate_size: int, where: _Locator) -> None:
    if not neurons.numel():
        return
    low, high = torch.aminmax(neurons)
    if int(low) < 0 or int(high) >= intermediate_size:
        i = int(((neurons < 0) | (neurons >= intermediate_size)).nonzero()[0])
        raise ValueError(f"{NEURONS}[{i}] = {int(neurons[i])} ({where.neuron(i)}) is out of range for "
                         f"base_model.intermediate_size {intermediate_size}")
    sorted_ = _within_parts(neurons, layer_offsets)
    if bool(sorted_.all()):
        return
    # Unsorted segments (a user may build a LayerUpdate with any order): check those for repeats one by one.
    for s in sorted({where.segment_of(int(i)) for i in (~sorted_).nonzero().flatten().tolist()}):
        start, stop = int(layer_offsets[s]), int(layer_offsets[s + 1])
        values = neurons[start:stop]
        unique, counts = values.unique(return_counts=True)
        if bool((counts > 1).any()):
            repeated = int(unique[counts > 1][0])
            raise ValueError(f"{NEURONS}[{start}:{stop}] ({where.segment(s)}) repeats neuron index {repeated}; "
                             "indices must be distinct within a layer")


# -- formats 1 and 2 ---------------------------------------------------------------------------------
def decode_per_entry(entries: Sequence[dict[str, Any]], tensors: dict[str, torch.Tensor],
                     intermediate_size: int) -> EditBank:
    """The bank of format-1/2 ``tensors``, checking that they are exactly the listed entries' layers."""
    stored: dict[str, set[int]] = {}
    for key in tensors:
        match = _TENSOR_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected tensor {key!r}")
        stored.setdefault(match[1], set()).add(int(match[2]))
    orphans = sorted(set(stored) - {e["id"] for e in entries})
    if orphans:
        raise ValueError(f"it stores tensors of entries that entries[] does not list: {orphans[:5]}")
    bank = EditBank()
    for index, raw in enumerate(entries):
        where = f"entries[{index}]"
        extra = sorted(stored.get(raw["id"], set()) - set(raw["layers"]))
        if extra:
            raise ValueError(f"{where}.layers is {raw['layers']} but the weights also store layer(s) {extra}")
        updates = {}
        for layer in raw["layers"]:
            keys = [f"{raw['id']}/{layer}/neurons", f"{raw['id']}/{layer}/delta"]
            missing = [key for key in keys if key not in tensors]
            if missing:
                raise ValueError(f"{where}.layers lists {layer} but the weights have no tensor {missing[0]!r}")
            try:
                update = LayerUpdate(tensors[keys[0]], tensors[keys[1]])
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where} layer {layer}: {error}") from None
            top = int(update.neurons.max()) if update.neurons.numel() else -1
            if top >= intermediate_size:
                raise ValueError(f"{where} layer {layer}: neuron index {top} is out of range for "
                                 f"base_model.intermediate_size {intermediate_size}")
            updates[layer] = update
        try:
            bank.add(BankEntry(subjects=raw["subjects"], updates=updates, metadata=raw["metadata"], id=raw["id"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
    return bank
