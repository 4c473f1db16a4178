"""``routes``: what fired where (stage by stage), for debugging and for the routing benchmark."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from lafn_hf.modeling import decoder_layers

from ..hooks import ForwardScope
from ..tokens import encode_texts

_TRACE: ContextVar[list[Route] | None] = ContextVar("lafn_route_trace", default=None)


@dataclass(frozen=True)
class Route:
    """Entry ``entry_id`` fired at token ``position`` of batch row ``row``; ``stage`` is "lexical" (a subject
    or alias), "relation" (chosen by key among entries sharing the matched subject) or "representation"."""

    row: int
    position: int
    entry_id: str
    stage: str


def record(route: Route) -> None:
    """Note ``route`` when the calling context is tracing (inside ``tracing``); else nothing."""
    trace = _TRACE.get()
    if trace is not None:
        trace.append(route)


def tracing_active() -> bool:
    return _TRACE.get() is not None


@contextmanager
def tracing() -> Iterator[list[Route]]:
    """Collect the routes of this thread's/context's forwards inside the block."""
    found: list[Route] = []
    token = _TRACE.set(found)
    try:
        yield found
    finally:
        _TRACE.reset(token)


class _Enough(Exception):
    """Raised once the layers that route have run."""


@torch.no_grad()
def routes(model: Any, texts: Sequence[str], batch_size: int = 16, stop_at: int | None = None) -> list[list[Route]]:
    """Per text, the routes an ``EditableCausalLM`` takes on it (one forward each, nothing generated);
    ``Route.row`` is 0 and ``position`` indexes the text's tokens (special tokens included). ``stop_at``: end
    each forward when decoder layer ``stop_at`` is reached (every key layer must lie below it)."""
    def stop(*_: Any) -> None:
        raise _Enough

    device = next(model.parameters()).device
    out: list[list[Route]] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        input_ids, attention_mask = encode_texts(model.tokenizer, batch, device)
        with tracing() as found, ForwardScope() as scope:
            if stop_at is not None:
                scope.pre_hook(decoder_layers(model.model)[stop_at], stop)
            with suppress(_Enough):
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        for row in range(len(batch)):
            out.append(sorted((Route(0, r.position, r.entry_id, r.stage) for r in found if r.row == row),
                              key=lambda r: (r.position, r.entry_id)))
    return out
