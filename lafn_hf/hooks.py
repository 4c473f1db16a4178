"""Hooks that act only on the caller's own forwards, so editing never disturbs concurrent inference.

A ``ForwardScope`` marks the current thread (or asyncio task: it is a ``contextvars`` context) while it
is open. Hooks registered through it run their function only for forwards started inside the scope;
other threads calling the same model meanwhile see the hook as a no-op. Scopes nest. Every hook a scope
registered is removed when it closes (``finally``), and only those.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_OPEN_SCOPES: ContextVar[tuple[ForwardScope, ...]] = ContextVar("lafn_open_scopes", default=())


class ForwardScope:
    """Context manager owning hooks that only act inside it (this thread/context)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._tokens: list[Token[tuple[ForwardScope, ...]]] = []

    @property
    def active(self) -> bool:
        """Is the calling thread/context inside this scope?"""
        return self in _OPEN_SCOPES.get()

    def pre_hook(self, module: nn.Module, function: Callable[..., Any], *, with_kwargs: bool = False) -> RemovableHandle:
        """``module.register_forward_pre_hook`` for this scope's forwards only."""

        def scoped(*args: Any) -> Any:
            return function(*args) if self in _OPEN_SCOPES.get() else None

        return self._keep(module.register_forward_pre_hook(scoped, with_kwargs=with_kwargs))

    def forward_hook(self, module: nn.Module, function: Callable[..., Any]) -> RemovableHandle:
        """``module.register_forward_hook`` for this scope's forwards only."""

        def scoped(*args: Any) -> Any:
            return function(*args) if self in _OPEN_SCOPES.get() else None

        return self._keep(module.register_forward_hook(scoped))

    def _keep(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

    def __enter__(self) -> ForwardScope:
        self._tokens.append(_OPEN_SCOPES.set((*_OPEN_SCOPES.get(), self)))
        return self

    def __exit__(self, *exc: object) -> None:
        handles, self._handles = self._handles, []
        try:
            for handle in handles:
                handle.remove()
        finally:
            _OPEN_SCOPES.reset(self._tokens.pop())


class SkippedLayer(nn.Module):
    """Stands in for a lower decoder layer inside ``scope``: passes hidden states through, or returns a cached
    tensor; forwards from other threads/contexts run the original layer unchanged."""

    def __init__(self, original: nn.Module, scope: ForwardScope, cached: torch.Tensor | None = None) -> None:
        super().__init__()
        self.original = original
        self._scope = scope
        self.cached = cached

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self._scope.active:
            return self.original(hidden_states, *args, **kwargs)
        return self.cached if self.cached is not None else hidden_states

    def __getattr__(self, name: str) -> Any:  # layer attributes (attention_type, ...) read by the decoder
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)


def unwrapped(module: nn.Module) -> nn.Module:
    """``module``, or the layer a ``SkippedLayer`` stands in for (hooks meant to last go on that one)."""
    while isinstance(module, SkippedLayer):
        module = module.original
    return module
