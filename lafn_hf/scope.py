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
