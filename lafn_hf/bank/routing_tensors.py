"""The optional tensors of a bank's weights file that route it: representation keys and question scopes.

Routing keys (``lafn_hf.routing.keys``): K keys (entry index, space index, vector, threshold) and the C key
spaces they use (layer, mean, scale). Question scopes (``lafn_hf.routing.scope``): Q scopes (entry index, space
index, relation, margin, and rows ``scope_offsets[q]:scope_offsets[q+1]`` of ``scope_vectors``) and the D scope
spaces they use (layer, mean, scale, rows ``template_offsets[d]:template_offsets[d+1]`` of ``scope_templates`` /
``template_relations``, and, where stored, rows ``basis_offsets[d]:basis_offsets[d+1]`` of ``scope_bases``: the
space's discriminant basis, none for a space with no rows and for banks written before bases). Each group is
stored whole or not at all; spaces shared by entries are stored once. Every width is the model's hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .entries import EditBank, KeySpace, QuestionScope, RoutingKey, ScopeSpace

KEY_ENTRIES, KEY_SPACES, KEY_VECTORS, KEY_THRESHOLDS, SPACE_LAYERS, SPACE_MEANS, SPACE_SCALES = (
    "key_entries", "key_spaces", "key_vectors", "key_thresholds", "space_layers", "space_means", "space_scales")
ROUTING_TENSORS = (KEY_ENTRIES, KEY_SPACES, KEY_VECTORS, KEY_THRESHOLDS, SPACE_LAYERS, SPACE_MEANS, SPACE_SCALES)
SCOPE_TENSORS = (SCOPE_ENTRIES, SCOPE_SPACES, SCOPE_RELATIONS, SCOPE_MARGINS, SCOPE_OFFSETS, SCOPE_VECTORS,
                 SCOPE_SPACE_LAYERS, SCOPE_SPACE_MEANS, SCOPE_SPACE_SCALES, TEMPLATE_OFFSETS, SCOPE_TEMPLATES,
                 TEMPLATE_RELATIONS) = (
    "scope_entries", "scope_spaces", "scope_relations", "scope_margins", "scope_offsets", "scope_vectors",
    "scope_space_layers", "scope_space_means", "scope_space_scales", "template_offsets", "scope_templates",
    "template_relations")
BASIS_TENSORS = (BASIS_OFFSETS, SCOPE_BASES) = ("basis_offsets", "scope_bases")
#: Every optional tensor a weights file may hold beside an edit bank's own.
OPTIONAL_TENSORS = (*ROUTING_TENSORS, *SCOPE_TENSORS, *BASIS_TENSORS)


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


def encode_routing(bank: EditBank) -> dict[str, torch.Tensor]:
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
    TEMPLATE_OFFSETS: (torch.int64, 1), SCOPE_TEMPLATES: (torch.float32, 2), TEMPLATE_RELATIONS: (torch.int64, 1),
    BASIS_OFFSETS: (torch.int64, 1), SCOPE_BASES: (torch.float32, 2)}


def encode_scopes(bank: EditBank) -> dict[str, torch.Tensor]:
    """The question-scope tensors (none when no entry has a scope); shared spaces are stored once."""
    scoped = [(index, entry.scope) for index, entry in enumerate(bank) if entry.scope is not None]
    if not scoped:
        return {}
    ordered, space_of = _spaces_once([scope.space for _, scope in scoped])
    bases = {} if all(space.basis is None for space in ordered) else {
        BASIS_OFFSETS: _offsets([0 if space.basis is None else space.basis.shape[0] for space in ordered]),
        SCOPE_BASES: torch.cat([space.basis.detach().cpu() for space in ordered if space.basis is not None])}
    return bases | {
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


def _bases(tensors: dict[str, torch.Tensor], count: int) -> list[torch.Tensor]:
    """Each of ``count`` spaces' basis rows (none: no basis), checked: finite, at most as many as the width."""
    bases = _rows(tensors, BASIS_OFFSETS, SCOPE_BASES, count)
    width = tensors[SCOPE_BASES].shape[1]
    for space, rows in enumerate(bases):
        if rows.shape[0] > width:
            raise ValueError(f"{BASIS_OFFSETS} gives scope space {space} {rows.shape[0]} basis rows, more than the "
                             f"hidden size {width}")
    if not bool(torch.isfinite(tensors[SCOPE_BASES]).all()):
        raise ValueError(f"{SCOPE_BASES} holds a value that is not finite")
    return bases


def _stored(tensors: dict[str, torch.Tensor], names: Sequence[str], what: str) -> bool:
    """Whether the optional tensors ``names`` are stored: all of them, or none (else ``ValueError``)."""
    present = [name for name in names if name in tensors]
    if present and len(present) != len(names):
        raise ValueError(f"{what} tensor {sorted(set(names) - set(present))[0]!r} is missing")
    return bool(present)


def decode_scopes(tensors: dict[str, torch.Tensor], count: int) -> dict[int, QuestionScope]:
    """Entry index -> question scope, from the scope tensors (absent: none); ``ValueError`` naming the tensor."""
    bases = _stored(tensors, BASIS_TENSORS, "scope basis")
    if not _stored(tensors, SCOPE_TENSORS, "scope"):
        if bases:
            raise ValueError(f"{SCOPE_BASES} is stored without question scopes")
        return {}
    for name, (dtype, dims) in _SCOPE_KINDS.items():
        if name not in tensors:
            continue
        if tensors[name].dtype != dtype or tensors[name].dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D {str(dtype).removeprefix('torch.')} tensor, got "
                             f"{str(tensors[name].dtype).removeprefix('torch.')} of shape {tuple(tensors[name].shape)}")
    try:
        layers = tensors[SCOPE_SPACE_LAYERS].tolist()
        templates = _rows(tensors, TEMPLATE_OFFSETS, SCOPE_TEMPLATES, len(layers))
        relations = _rows(tensors, TEMPLATE_OFFSETS, TEMPLATE_RELATIONS, len(layers))
        basis = _bases(tensors, len(layers)) if bases else [torch.zeros(0)] * len(layers)
        spaces = [ScopeSpace(int(layer), mean.float().clone(), scale.float().clone(), rows.float().clone(),
                             kinds.clone(), basis_rows.float().clone() if basis_rows.shape[0] else None)
                  for layer, mean, scale, rows, kinds, basis_rows in
                  zip(layers, tensors[SCOPE_SPACE_MEANS], tensors[SCOPE_SPACE_SCALES], templates, relations, basis,
                      strict=True)]
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
                SCOPE_VECTORS, SCOPE_BASES)
_SPACE_LAYERS = (SPACE_LAYERS, SCOPE_SPACE_LAYERS)


def check_model_shapes(tensors: dict[str, torch.Tensor], hidden_size: int, num_hidden_layers: int) -> None:
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


def decode_routing(tensors: dict[str, torch.Tensor], count: int) -> dict[int, RoutingKey]:
    """Entry index -> routing key, from the routing tensors (absent: none); ``ValueError`` naming the tensor."""
    if not _stored(tensors, ROUTING_TENSORS, "routing"):
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
