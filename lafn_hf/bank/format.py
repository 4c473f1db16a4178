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
from .entries import _ENTRY_ID, BankEntry, EditBank, KeySpace, LayerUpdate, QuestionScope, RoutingKey, ScopeSpace

NEURONS, DELTAS, LAYER_OFFSETS, SEGMENT_LAYERS, ENTRY_OFFSETS = (
    "neurons", "deltas", "layer_offsets", "segment_layers", "entry_offsets")
# Optional (routing, ``lafn_hf.routing``): K routing keys (entry index, space index, vector, threshold) and the
# C key spaces they use (layer, mean, scale).
KEY_ENTRIES, KEY_SPACES, KEY_VECTORS, KEY_THRESHOLDS, SPACE_LAYERS, SPACE_MEANS, SPACE_SCALES = (
    "key_entries", "key_spaces", "key_vectors", "key_thresholds", "space_layers", "space_means", "space_scales")
_ROUTING = (KEY_ENTRIES, KEY_SPACES, KEY_VECTORS, KEY_THRESHOLDS, SPACE_LAYERS, SPACE_MEANS, SPACE_SCALES)
# Optional (question scopes, ``lafn_hf.routing.scope``): Q scopes (entry index, space index, relation, margin, and
# rows scope_offsets[q]:scope_offsets[q+1] of scope_vectors) and the D scope spaces they use (layer, mean, scale,
# and rows template_offsets[d]:template_offsets[d+1] of scope_templates / template_relations).
SCOPE_TENSORS = (SCOPE_ENTRIES, SCOPE_SPACES, SCOPE_RELATIONS, SCOPE_MARGINS, SCOPE_OFFSETS, SCOPE_VECTORS,
                 SCOPE_SPACE_LAYERS, SCOPE_SPACE_MEANS, SCOPE_SPACE_SCALES, TEMPLATE_OFFSETS, SCOPE_TEMPLATES,
                 TEMPLATE_RELATIONS) = (
    "scope_entries", "scope_spaces", "scope_relations", "scope_margins", "scope_offsets", "scope_vectors",
    "scope_space_layers", "scope_space_means", "scope_space_scales", "template_offsets", "scope_templates",
    "template_relations")
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
    tensors.update(_encode_routing(bank))
    tensors.update(_encode_scopes(bank))
    return {name: tensor.contiguous() for name, tensor in tensors.items()}, rows


def _spaces_once(spaces: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """(the distinct space objects in first-use order, each given space's index among them): entries made
    together share one space object, stored once."""
    index: dict[int, int] = {}
    ordered: list[Any] = []
    for space in spaces:
        if id(space) not in index:
            index[id(space)] = len(ordered)
            ordered.append(space)
    return ordered, [index[id(space)] for space in spaces]


def _encode_routing(bank: EditBank) -> dict[str, torch.Tensor]:
    """The routing tensors (none when no entry has a key); spaces shared by several keys are stored once."""
    keyed = [(index, entry.key) for index, entry in enumerate(bank) if entry.key is not None]
    if not keyed:
        return {}
    ordered, space_of = _spaces_once([key.space for _, key in keyed])
    return {
        KEY_ENTRIES: torch.tensor([index for index, _ in keyed], dtype=torch.int64),
        KEY_SPACES: torch.tensor(space_of, dtype=torch.int64),
        KEY_VECTORS: torch.stack([key.vector.detach().cpu() for _, key in keyed]),
        KEY_THRESHOLDS: torch.tensor([key.threshold for _, key in keyed], dtype=torch.float64),  # exact floats
        SPACE_LAYERS: torch.tensor([space.layer for space in ordered], dtype=torch.int32),
        SPACE_MEANS: torch.stack([space.mean.detach().cpu() for space in ordered]),
        SPACE_SCALES: torch.stack([space.scale.detach().cpu() for space in ordered]),
    }


_SCOPE_KINDS = {  # name -> (dtype, dimensions) of each scope tensor
    SCOPE_ENTRIES: (torch.int64, 1), SCOPE_SPACES: (torch.int64, 1), SCOPE_RELATIONS: (torch.int64, 1),
    SCOPE_MARGINS: (torch.float64, 1), SCOPE_OFFSETS: (torch.int64, 1), SCOPE_VECTORS: (torch.float32, 2),
    SCOPE_SPACE_LAYERS: (torch.int32, 1), SCOPE_SPACE_MEANS: (torch.float32, 2), SCOPE_SPACE_SCALES: (torch.float32, 2),
    TEMPLATE_OFFSETS: (torch.int64, 1), SCOPE_TEMPLATES: (torch.float32, 2), TEMPLATE_RELATIONS: (torch.int64, 1)}


def _encode_scopes(bank: EditBank) -> dict[str, torch.Tensor]:
    """The question-scope tensors (none when no entry has a scope); shared spaces are stored once."""
    scoped = [(index, entry.scope) for index, entry in enumerate(bank) if entry.scope is not None]
    if not scoped:
        return {}
    ordered, space_of = _spaces_once([scope.space for _, scope in scoped])
    return {
        SCOPE_ENTRIES: torch.tensor([index for index, _ in scoped], dtype=torch.int64),
        SCOPE_SPACES: torch.tensor(space_of, dtype=torch.int64),
        SCOPE_RELATIONS: torch.tensor([scope.relation for _, scope in scoped], dtype=torch.int64),
        SCOPE_MARGINS: torch.tensor([scope.margin for _, scope in scoped], dtype=torch.float64),
        SCOPE_OFFSETS: _offsets([scope.vectors.shape[0] for _, scope in scoped]),
        SCOPE_VECTORS: torch.cat([scope.vectors.detach().cpu() for _, scope in scoped]),
        SCOPE_SPACE_LAYERS: torch.tensor([space.layer for space in ordered], dtype=torch.int32),
        SCOPE_SPACE_MEANS: torch.stack([space.mean.detach().cpu() for space in ordered]),
        SCOPE_SPACE_SCALES: torch.stack([space.scale.detach().cpu() for space in ordered]),
        TEMPLATE_OFFSETS: _offsets([space.templates.shape[0] for space in ordered]),
        SCOPE_TEMPLATES: torch.cat([space.templates.detach().cpu() for space in ordered]),
        TEMPLATE_RELATIONS: torch.cat([space.relations.detach().cpu() for space in ordered]),
    }


def _offsets(counts: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)


def _rows(tensors: dict[str, torch.Tensor], offsets_name: str, rows_name: str, count: int) -> list[torch.Tensor]:
    """``count`` slices of ``tensors[rows_name]`` cut at ``tensors[offsets_name]`` (checked)."""
    offsets, rows = tensors[offsets_name], tensors[rows_name]
    if offsets.dtype != torch.int64 or offsets.shape != (count + 1,):
        raise ValueError(f"{offsets_name} must be a ({count + 1},) int64 tensor, got {offsets.dtype} {tuple(offsets.shape)}")
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != rows.shape[0] or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"{offsets_name} must rise from 0 to the {rows.shape[0]} rows of {rows_name}")
    return [rows[a:b] for a, b in zip(bounds, bounds[1:])]


def _stored(tensors: dict[str, torch.Tensor], names: Sequence[str], what: str) -> bool:
    """Whether the optional tensors ``names`` are stored: all of them, or none (else ``ValueError``)."""
    present = [name for name in names if name in tensors]
    if present and len(present) != len(names):
        raise ValueError(f"{what} tensor {sorted(set(names) - set(present))[0]!r} is missing")
    return bool(present)


def _decode_scopes(tensors: dict[str, torch.Tensor], count: int) -> dict[int, QuestionScope]:
    """Entry index -> question scope, from the scope tensors (absent: none); ``ValueError`` naming the tensor."""
    if not _stored(tensors, SCOPE_TENSORS, "scope"):
        return {}
    for name, (dtype, dims) in _SCOPE_KINDS.items():
        if tensors[name].dtype != dtype or tensors[name].dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D {str(dtype).removeprefix('torch.')} tensor, got "
                             f"{str(tensors[name].dtype).removeprefix('torch.')} of shape {tuple(tensors[name].shape)}")
    try:
        layers = tensors[SCOPE_SPACE_LAYERS].tolist()
        templates = _rows(tensors, TEMPLATE_OFFSETS, SCOPE_TEMPLATES, len(layers))
        relations = _rows(tensors, TEMPLATE_OFFSETS, TEMPLATE_RELATIONS, len(layers))
        spaces = [ScopeSpace(int(layer), mean.float().clone(), scale.float().clone(), rows.float().clone(),
                             kinds.clone()) for layer, mean, scale, rows, kinds in
                  zip(layers, tensors[SCOPE_SPACE_MEANS], tensors[SCOPE_SPACE_SCALES], templates, relations, strict=True)]
        entries = tensors[SCOPE_ENTRIES].tolist()
        vectors = _rows(tensors, SCOPE_OFFSETS, SCOPE_VECTORS, len(entries))
        scopes: dict[int, QuestionScope] = {}
        for index, space, relation, margin, rows in zip(entries, tensors[SCOPE_SPACES].tolist(),
                                                        tensors[SCOPE_RELATIONS].tolist(),
                                                        tensors[SCOPE_MARGINS].tolist(), vectors, strict=True):
            if not 0 <= index < count or index in scopes:
                raise ValueError(f"{SCOPE_ENTRIES} holds {index}: not one entry index of {count} (or given twice)")
            if not 0 <= space < len(spaces):
                raise ValueError(f"{SCOPE_SPACES} holds {space}: there are {len(spaces)} scope spaces")
            scopes[index] = QuestionScope(spaces[space], rows.float().clone(), int(relation), float(margin))
    except (TypeError, RuntimeError, IndexError, OverflowError) as error:
        raise ValueError(f"scope tensors are malformed: {error}") from None
    return scopes


# Read against the model's hidden states: rows of hidden_size values, spaces at one of its layers.
_HIDDEN_WIDE = (SPACE_MEANS, SPACE_SCALES, KEY_VECTORS, SCOPE_SPACE_MEANS, SCOPE_SPACE_SCALES, SCOPE_TEMPLATES,
                SCOPE_VECTORS)
_SPACE_LAYERS = (SPACE_LAYERS, SCOPE_SPACE_LAYERS)


def _check_model_shapes(tensors: dict[str, torch.Tensor], hidden_size: int, num_hidden_layers: int) -> None:
    """``ValueError`` naming the routing or scope tensor whose width is not ``hidden_size``, or whose space
    layer is not one of the ``num_hidden_layers`` layers."""
    for name in (name for name in _HIDDEN_WIDE if name in tensors):
        shape = tuple(tensors[name].shape)
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D (rows of base_model.hidden_size {hidden_size}), got shape {shape}")
        if shape[1] != hidden_size:
            raise ValueError(f"{name} has {shape[1]} columns, base_model.hidden_size is {hidden_size}")
    for name in (name for name in _SPACE_LAYERS if name in tensors):
        layers = tensors[name].flatten()
        outside = (layers < 0) | (layers >= num_hidden_layers)
        if bool(outside.any()):
            i = int(outside.nonzero()[0])
            raise ValueError(f"{name}[{i}] = {int(layers[i])} is out of range for base_model.num_hidden_layers "
                             f"{num_hidden_layers}")


def _decode_routing(tensors: dict[str, torch.Tensor], count: int) -> dict[int, RoutingKey]:
    """Entry index -> routing key, from the routing tensors (absent: none); ``ValueError`` naming the tensor."""
    if not _stored(tensors, _ROUTING, "routing"):
        return {}
    try:
        spaces = [KeySpace(int(layer), mean.float().clone(), scale.float().clone()) for layer, mean, scale in
                  zip(tensors[SPACE_LAYERS].tolist(), tensors[SPACE_MEANS], tensors[SPACE_SCALES], strict=True)]
        keys: dict[int, RoutingKey] = {}
        for index, space, vector, threshold in zip(tensors[KEY_ENTRIES].tolist(), tensors[KEY_SPACES].tolist(),
                                                   tensors[KEY_VECTORS], tensors[KEY_THRESHOLDS].tolist(), strict=True):
            if not 0 <= index < count or index in keys:
                raise ValueError(f"{KEY_ENTRIES} holds {index}: not one entry index of {count} (or given twice)")
            if not 0 <= space < len(spaces):
                raise ValueError(f"{KEY_SPACES} holds {space}: there are {len(spaces)} key spaces")
            keys[index] = RoutingKey(spaces[space], vector.float().clone(), float(threshold))
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"routing tensors are malformed: {error}") from None
    return keys


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
    unexpected = sorted(set(tensors) - set(_DTYPES) - set(_ROUTING) - set(SCOPE_TENSORS))
    if unexpected:
        raise ValueError(f"unexpected tensor {unexpected[0]!r} (format 3 stores {', '.join(_DTYPES)}, for "
                         f"routing {', '.join(_ROUTING)}, and for question scopes {', '.join(SCOPE_TENSORS)})")
    _check_model_shapes(tensors, hidden_size, num_hidden_layers)
    keys = _decode_routing(tensors, len(entries))
    scopes = _decode_scopes(tensors, len(entries))
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
