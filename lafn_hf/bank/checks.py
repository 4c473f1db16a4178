"""Checks that keep a bank from anyone from breaking a model: the subjects and aliases of a loaded bank pass the
rule that ``edit()`` and ``add_aliases`` apply (``lafn_hf.config.surface_form_problem``; at most
``lafn_hf.text.MAX_FORM_LENGTH`` characters); dV and routing spaces fit what the model's dtype holds
(``ValueRange``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lafn_hf.modeling import decoder_layers, mlp_parts

from ..request import surface_form_problem
from ..text import MAX_FORM_LENGTH, check_form_length
from .entries import BankEntry, EditBank, KeySpace, LayerUpdate


def check_surface_forms(entries: Sequence[dict[str, Any]], allow_common: bool) -> None:
    """``ValueError`` naming the first config entry field (``entries[i].subjects.<lang>``, ``entries[i].aliases[k]``)
    that is too long, or, unless ``allow_common``, too short or a frequent function word (the values are not
    repeated: they come from a file). About a second for a million entries."""
    for index, entry in enumerate(entries):
        for lang, subject in entry["subjects"].items():
            if len(subject) > MAX_FORM_LENGTH or not allow_common and surface_form_problem(subject, lang):
                _refuse(f"entries[{index}].subjects.{lang}", subject, lang, allow_common)
        for k, alias in enumerate(entry.get("aliases", ())):
            if len(alias) > MAX_FORM_LENGTH or not allow_common and surface_form_problem(alias, None):
                _refuse(f"entries[{index}].aliases[{k}]", alias, None, allow_common)


def _refuse(where: str, form: str, language: str | None, allow_common: bool) -> None:
    check_form_length(form, where)
    problem = None if allow_common else surface_form_problem(form, language)
    if problem:
        raise ValueError(f"{where} is refused: {problem}; a bank subject or alias edits every prompt it occurs in, "
                         "load with allow_common=True to accept it")


class ValueRange:
    """dV and routing spaces that a model's dtype holds.

    For each entry and layer, with c_j = max_i |W_down[i, j]| (the largest weight out of neuron j): the
    largest |dV| and sum_k c_{n_k} |dV_k| (the most dV can change one output of ``down_proj``) must stay within
    a quarter of the dtype's largest value (headroom for the values and the residual stream they add to); the
    mean and scale of its routing key's and question scope's spaces (measured on the model's hidden states)
    within the largest value. A float16 model given a dV of 1e6 otherwise answers every prompt naming the
    subject with NaN. ``check`` refuses entries (``ValueError`` naming the entry, layer and value) before they
    enter; ``ensure``, called at each forward, checks the bank again when it or the model's dtype changed (a
    model cast after its bank was set).
    """

    headroom = 4.0

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._columns: dict[tuple[int, torch.dtype], torch.Tensor | None] = {}
        self._checked: tuple[int, int, torch.dtype | None] | None = None  # (bank uid, version, dtype) found fine

    def dtype(self) -> torch.dtype | None:
        """The dtype of the model's first floating-point parameter (what its values are computed in)."""
        return next((p.dtype for p in self._model.parameters() if p.is_floating_point()), None)

    @torch.no_grad()
    def check(self, entries: Sequence[BankEntry], dtype: torch.dtype | None = None) -> None:
        """``ValueError`` naming the first entry (and layer) whose dV or routing space ``dtype`` (default: the
        model's) cannot hold; checked in bulk, per layer."""
        dtype = dtype or self.dtype()
        if dtype is None or not dtype.is_floating_point or not entries:
            return
        largest = float(torch.finfo(dtype).max)
        self._check_spaces(entries, dtype, largest)
        by_layer: dict[int, list[tuple[str, LayerUpdate]]] = {}
        for entry in entries:
            for layer, update in entry.updates.items():
                by_layer.setdefault(layer, []).append((entry.id, update))
        for layer, updates in sorted(by_layer.items()):
            self._check_layer(layer, updates, dtype, largest / self.headroom)

    def ensure(self, bank: EditBank) -> None:
        """``check`` what changed since the last call found the bank fine: entries added meanwhile, or the whole
        bank when it is another bank or the model's dtype changed. Cheap when nothing changed."""
        dtype, last = self.dtype(), self._checked
        if last == (bank.uid, bank.version, dtype):
            return
        changes = bank.changes_since(last[1]) if last is not None and last[0] == bank.uid and last[2] == dtype else None
        if changes is None:
            version, entries = bank.snapshot()
        else:
            version = changes[0]
            entries = [e for op, e in changes[1] if op == "add" and e.id in bank and bank.get(e.id) is e]
        self.check(entries, dtype)
        self._checked = (bank.uid, version, dtype)

    def _check_layer(self, layer: int, updates: list[tuple[str, LayerUpdate]], dtype: torch.dtype, limit: float) -> None:
        magnitudes = _cat_cpu([update.delta for _, update in updates]).double().abs()  # (N,)
        counts = torch.tensor([update.delta.numel() for _, update in updates])
        owner = torch.repeat_interleave(torch.arange(len(updates)), counts)  # (N,) update of each value
        columns = self._column_max(layer, dtype)
        weighted = magnitudes if columns is None else (
            columns[_cat_cpu([update.neurons for _, update in updates])] * magnitudes)
        reach = torch.zeros(len(updates), dtype=torch.float64).index_add_(0, owner, weighted)
        top = torch.zeros(len(updates), dtype=torch.float64).scatter_reduce_(0, owner, magnitudes, "amax")
        bad = (reach > limit) | (top > limit)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"entry {updates[i][0]!r} layer {layer}: dV (largest |dV| {float(top[i]):.3g}) can change an "
                             f"output of down_proj by up to {float(reach[i]):.3g}, more than {_name(dtype)} holds with "
                             f"headroom ({limit:.6g}); the model would answer NaN")

    def _column_max(self, layer: int, dtype: torch.dtype) -> torch.Tensor | None:
        """max_i |W_down[i, j]| of ``layer`` per neuron j (float64, CPU; ``None`` for weights that are not plain
        floating-point tensors, then read as at most 1)."""
        key = (layer, dtype)
        if key not in self._columns:
            weight = getattr(mlp_parts(decoder_layers(self._model)[layer]).down_proj, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.device.type != "meta":
                self._columns[key] = weight.detach().abs().amax(dim=0).double().cpu()
            else:
                self._columns[key] = None
        return self._columns[key]

    @staticmethod
    def _check_spaces(entries: Sequence[BankEntry], dtype: torch.dtype, largest: float) -> None:
        seen: set[int] = set()
        for entry in entries:
            for what, space in (("routing key's", entry.key.space if entry.key else None),
                                ("question scope's", entry.scope.space if entry.scope else None)):
                if space is None or id(space) in seen:
                    continue
                seen.add(id(space))
                _check_space(entry.id, what, space, dtype, largest)


def _check_space(entry_id: str, what: str, space: KeySpace, dtype: torch.dtype, largest: float) -> None:
    for name in ("mean", "scale"):
        top = float(getattr(space, name).abs().max())
        if top > largest:
            raise ValueError(f"entry {entry_id!r}: its {what} space {name} reaches {top:.3g}, more than {_name(dtype)} "
                             f"holds ({largest:.6g})")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cat_cpu(parts: list[torch.Tensor]) -> torch.Tensor:
    try:
        return torch.cat(parts).cpu()
    except RuntimeError:  # on different devices
        return torch.cat([part.cpu() for part in parts])
