"""Apply dV at inference: hooks on ``mlp.down_proj`` whose input is the neuron values V.

Eq. 10: F'(x) = F_(theta, V + dV)(x) when a bank subject s is found in x, else F(x). The update
is added only at the last token of each matched subject, only in the prefill forward (no
past key/values), so decoding with a KV cache reproduces a full forward of the same tokens.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lafn_hf.modeling import decoder_layers, mlp_parts

from .bank import EditBank
from .matcher import SubjectHit, SubjectMatcher, find_subject_tokens

logger = logging.getLogger(__name__)
_OWNER_ATTRIBUTE = "_lafn_injector"  # on the base model: a weak reference to the attached BankInjector


@dataclass(frozen=True)
class LayerPlan:
    """Flat lists of (row, position, neuron) and the float32 value added there."""

    rows: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    neurons: torch.Tensor  # (N,) int64
    values: torch.Tensor  # (N,) float32, may require grad

    @classmethod
    def build(cls, hits: Sequence[tuple[int, int]], neurons: torch.Tensor, delta: torch.Tensor) -> LayerPlan:
        """One (neurons, delta) update applied at every (row, position) in ``hits``."""
        device = neurons.device
        where = torch.tensor(hits, dtype=torch.long, device=device).reshape(-1, 2)  # (H, 2)
        count = neurons.numel()
        return cls(
            rows=where[:, 0].repeat_interleave(count),
            positions=where[:, 1].repeat_interleave(count),
            neurons=neurons.repeat(len(hits)),
            values=delta.repeat(len(hits)),
        )

    @classmethod
    def concat(cls, plans: Sequence[LayerPlan]) -> LayerPlan:
        return cls(*(torch.cat([getattr(p, name) for p in plans]) for name in ("rows", "positions", "neurons", "values")))


def add_values(values: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """V' = V + dV: ``values`` is (B, T, I); dV (float32) is cast to V's dtype; repeats add up."""
    index = (plan.rows, plan.positions, plan.neurons)
    return values.index_put(index, plan.values.to(values.dtype), accumulate=True)


class ValueInjection:
    """Owns forward pre-hooks on ``down_proj`` of ``layers``; adds ``self.plan`` to their input.

    Usable as a context manager; hooks are removed in ``finally`` and only our own handles are
    removed. ``plan`` maps layer index -> ``LayerPlan``; ``None`` or a missing layer = no change.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int]) -> None:
        self._model = model
        self._layers = tuple(layers)
        self._handles: list[RemovableHandle] = []
        self.plan: dict[int, LayerPlan] | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def handles(self) -> tuple[RemovableHandle, ...]:
        return tuple(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        modules = decoder_layers(self._model)
        for layer in self._layers:
            if not 0 <= layer < len(modules):
                raise ValueError(f"layer {layer} is out of range for a model with {len(modules)} layers")
        try:
            for layer in self._layers:
                down_proj = mlp_parts(modules[layer]).down_proj
                self._handles.append(down_proj.register_forward_pre_hook(self._hook_for(layer)))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _hook_for(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            plan = self.plan.get(layer) if self.plan else None
            if plan is None:
                return None
            return (add_values(args[0], plan), *args[1:])

        return hook

    def __enter__(self) -> ValueInjection:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _is_prefill(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("past_key_values")
    if cache is None:
        return True
    get_length = getattr(cache, "get_seq_length", None)
    return get_length is not None and int(get_length()) == 0


class BankInjector:
    """Applies an ``EditBank`` to a model for every forward (so ``generate`` and pipelines work).

    A forward pre-hook on the model finds bank subjects in the prefill ``input_ids`` (per row,
    padding excluded through ``attention_mask``) and, when some match, attaches a ``ValueInjection``
    on just the layers the plan touches; a forward hook (``always_call``) removes it. Decoding steps
    and forwards without a match thus run with two hooks only. Forwards given ``inputs_embeds``
    instead of ``input_ids`` cannot be matched and run unedited.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, bank: EditBank) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self.bank = bank
        self._values: ValueInjection | None = None  # only during a forward that applies a plan
        self._handles: list[RemovableHandle] = []
        self._built_for: tuple[int, int, torch.device] | None = None
        self._matcher = SubjectMatcher(())
        self._subject_index: dict[str, tuple[str, ...]] = {}
        self._device_updates: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def handles(self) -> tuple[RemovableHandle, ...]:
        return (*self._handles, *(self._values.handles() if self._values is not None else ()))

    def attach(self) -> None:
        """Install the hooks; a model carries at most one attached injector (two would add two banks)."""
        if self._handles:
            return
        owner_ref = getattr(self._model, _OWNER_ATTRIBUTE, None)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None and owner is not self and owner.attached:
            raise ValueError(f"this {type(self._model).__name__} already carries the edit hooks of another "
                             "EditableCausalLM; call .unwrap() on that one first (or keep using it)")
        try:
            object.__setattr__(self._model, _OWNER_ATTRIBUTE, weakref.ref(self))
            self._handles.append(self._model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._handles.append(self._model.register_forward_hook(self._after_forward, always_call=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._drop_values()
        owner_ref = getattr(self._model, _OWNER_ATTRIBUTE, None)
        if owner_ref is not None and owner_ref() is self:
            object.__delattr__(self._model, _OWNER_ATTRIBUTE)

    def plan_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[int, LayerPlan] | None:
        """The per-layer plan for a prefill batch (``None`` when no subject matches)."""
        if len(self.bank) == 0:
            return None
        self._refresh(input_ids.device)
        rows = input_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None and attention_mask.dim() == 2 else None
        per_layer: dict[int, list[LayerPlan]] = {}
        for row, ids in enumerate(rows):
            keep = [i for i, m in enumerate(masks[row]) if m] if masks is not None else list(range(len(ids)))
            hits = find_subject_tokens(self._tokenizer, [ids[i] for i in keep], self._matcher, self._special_ids)
            for hit in hits:
                self._add_hit(per_layer, row, keep[hit.position], hit)
        if not per_layer:
            return None
        return {layer: LayerPlan.concat(plans) for layer, plans in per_layer.items()}

    def _add_hit(self, per_layer: dict[int, list[LayerPlan]], row: int, position: int, hit: SubjectHit) -> None:
        for entry_id in self._subject_index.get(hit.subject, ()):
            for layer in self.bank.get(entry_id).updates:
                neurons, delta = self._device_updates[(entry_id, layer)]
                per_layer.setdefault(layer, []).append(LayerPlan.build([(row, position)], neurons, delta))

    def _refresh(self, device: torch.device) -> None:
        key = (id(self.bank), self.bank.version, device)
        if self._built_for == key:
            return
        index = self.bank.subject_index()
        self._matcher = SubjectMatcher(index)
        self._subject_index = index
        self._device_updates = {
            (entry.id, layer): (update.neurons.to(device), update.delta.to(device))
            for entry in self.bank
            for layer, update in entry.updates.items()
        }
        self._built_for = key

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._drop_values()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or not _is_prefill(kwargs):
            return
        plan = self.plan_for(input_ids, kwargs.get("attention_mask"))
        if plan is None:
            return
        values = ValueInjection(self._model, sorted(plan))
        values.plan = plan
        values.attach()
        self._values = values

    def _after_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._drop_values()

    def _drop_values(self) -> None:
        values, self._values = self._values, None
        if values is not None:
            values.detach()
