"""dV added to the neuron values V (the input of ``mlp.down_proj``): plans of where, and the hooks that add them
while dV is optimised (``ValueInjection``); at inference ``lafn_hf.runtime.inject`` adds the bank's plans."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lafn_hf.modeling import decoder_layers, mlp_parts

from .hooks import ForwardScope


@dataclass(frozen=True)
class LayerPlan:
    """Flat lists of (row, position, neuron) and the float32 value added there."""

    rows: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    neurons: torch.Tensor  # (N,) int64
    values: torch.Tensor  # (N,) float32, may require grad

    @classmethod
    def build(cls, hits: Sequence[tuple[int, int]] | torch.Tensor, neurons: torch.Tensor, delta: torch.Tensor) -> LayerPlan:
        """One (neurons, delta) update applied at every (row, position) in ``hits``: pairs, or an (H, 2) int64
        tensor on the neurons' device (``hit_tensor``; built once, it saves a host-to-device copy per call)."""
        where = hits if isinstance(hits, torch.Tensor) else hit_tensor(hits, neurons.device)
        count = neurons.numel()
        return cls(
            rows=where[:, 0].repeat_interleave(count),
            positions=where[:, 1].repeat_interleave(count),
            neurons=neurons.repeat(where.shape[0]),
            values=delta.repeat(where.shape[0]),
        )

    @classmethod
    def concat(cls, plans: Sequence[LayerPlan]) -> LayerPlan:
        return cls(*(torch.cat([getattr(p, name) for p in plans]) for name in ("rows", "positions", "neurons", "values")))


def hit_tensor(hits: Sequence[tuple[int, int]], device: torch.device | str) -> torch.Tensor:
    """(H, 2) int64 (row, position) pairs on ``device``, for ``LayerPlan.build``."""
    return torch.tensor(hits, dtype=torch.long, device=device).reshape(-1, 2)


def add_values(values: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """V' = V + dV: ``values`` is (B, T, I); dV (float32) is cast to V's dtype; repeats add up."""
    index = (plan.rows, plan.positions, plan.neurons)
    return values.index_put(index, plan.values.to(values.dtype), accumulate=True)


class ValueInjection:
    """Adds ``self.plan`` to ``down_proj``'s input on ``layers``, for the opening thread's forwards only.

    A context manager (used while optimising dV): hooks are owned by a ``ForwardScope``, so concurrent
    inference on the same model is untouched, and removed on exit. ``plan`` maps layer -> ``LayerPlan``.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int]) -> None:
        self._model = model
        self._layers = tuple(layers)
        self._scope = ForwardScope()
        self.plan: dict[int, LayerPlan] | None = None

    def __enter__(self) -> ValueInjection:
        modules = decoder_layers(self._model)
        for layer in self._layers:
            if not 0 <= layer < len(modules):
                raise ValueError(f"layer {layer} is out of range for a model with {len(modules)} layers")
        self._scope.__enter__()
        try:
            for layer in self._layers:
                self._scope.pre_hook(mlp_parts(modules[layer]).down_proj, self._hook_for(layer))
        except BaseException:
            self._scope.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._scope.__exit__()

    def _hook_for(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            plan = self.plan.get(layer) if self.plan else None
            return None if plan is None else (add_values(args[0], plan), *args[1:])

        return hook
