"""Packed forwards: several requests' new tokens flattened into one row (continuous batching, vLLM).

An engine that packs requests calls the model with ``input_ids`` of shape (1, total new tokens) and
``cu_seq_lens_q``; nothing in those says which request a span of tokens belongs to. The engine says it with
``packed_batch`` around the forward: per request, in packing order, its ``RowReader`` (what the request has
read so far), where its new tokens start and how many there are, and the entries it applies. The injector
(``lafn_hf.runtime.inject``) then reads and plans each request as it does a batch row of ``generate()``, and adds
dV at (row 0, start + position). A description that does not match the forward's ``cu_seq_lens_q`` (or
``position_ids``) is refused: the forward runs unedited and the injector logs why.

``RequestReaders`` keeps one reader per request across forwards (the engine's request id -> reader). When a
request's reader has not read exactly the positions before its new tokens (the engine computed them in a
forward without a description, or moved the request out of and back into its cache), it is rebuilt from the
request's tokens, so a subject is found where ``generate()`` finds it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..routing.fire import KeyWork
from ..routing.row_reader import RowReader, decoder_for


@dataclass(frozen=True)
class PackedSequence:
    """One request's new tokens in a packed forward: ``input_ids[0, start : start + length]``, read after the
    ``len(reader)`` positions ``reader`` has read; ``selected``: the entry ids it applies (``None``: all)."""

    reader: RowReader
    start: int
    length: int
    selected: Container[str] | None = None


_PACKED: ContextVar[tuple[PackedSequence, ...] | None] = ContextVar("lafn_packed_batch", default=None)


@contextmanager
def packed_batch(sequences: Sequence[PackedSequence]) -> Iterator[None]:
    """Inside the block, packed forwards of the calling thread/context are read as ``sequences``."""
    token = enter_packed_batch(sequences)
    try:
        yield
    finally:
        leave_packed_batch(token)


def enter_packed_batch(sequences: Sequence[PackedSequence]) -> Token[tuple[PackedSequence, ...] | None]:
    """``packed_batch`` in two calls, for a forward pre-hook and forward hook pair (reset with
    ``leave_packed_batch`` in the same thread)."""
    return _PACKED.set(tuple(sequences))


def leave_packed_batch(token: Token[tuple[PackedSequence, ...] | None]) -> None:
    _PACKED.reset(token)


def current_packed_batch() -> tuple[PackedSequence, ...] | None:
    return _PACKED.get()


def layout_problem(sequences: Sequence[PackedSequence], cu_seq_lens_q: Any, position_ids: Any,
                   total: int) -> str | None:
    """Why ``sequences`` do not describe a packed forward of ``total`` tokens (``None``: they do). Each must
    be one span of ``cu_seq_lens_q`` in order (padding spans of length 0 may follow), and its first
    position id, when given, the length of what its reader has read."""
    bounds = [int(b) for b in cu_seq_lens_q.tolist()] if isinstance(cu_seq_lens_q, torch.Tensor) else None
    if bounds is None or len(bounds) < len(sequences) + 1:
        return f"{len(sequences)} described requests, cu_seq_lens_q {bounds}"
    for index, sequence in enumerate(sequences):
        start, end = bounds[index], bounds[index + 1]
        if (sequence.start, sequence.start + sequence.length) != (start, end):
            return (f"request {index} is described at tokens [{sequence.start}, {sequence.start + sequence.length}) "
                    f"but cu_seq_lens_q puts it at [{start}, {end})")
        if end > total:
            return f"request {index} ends at token {end} of a forward of {total}"
        if isinstance(position_ids, torch.Tensor) and sequence.length:
            first = int(position_ids.reshape(-1)[start])
            if first != len(sequence.reader):
                return f"request {index} starts at position {first} but its reader has read {len(sequence.reader)}"
    if any(bounds[i] != bounds[len(sequences)] for i in range(len(sequences), len(bounds))):
        return f"cu_seq_lens_q {bounds} holds more requests than the {len(sequences)} described"
    return None


def shifted(per_layer: dict[int, list[Any]], start: int) -> dict[int, list[Any]]:
    """Plans (``LayerPlan``) of one request moved from its own positions to the packed row's."""
    if not start:
        return per_layer
    return {layer: [replace(plan, positions=plan.positions + start) for plan in plans]
            for layer, plans in per_layer.items()}


def plan_packed(compiled: Any, input_ids: torch.Tensor, sequences: Sequence[PackedSequence],
                special_ids: torch.Tensor) -> tuple[dict[int, list[Any]], list[tuple[int, int, KeyWork]]]:
    """Read each request's new tokens and plan its lexical finds (``CompiledBank.lexical_plan``, one row per
    request); returns the plans at packed positions and, when the bank has routing keys or question scopes,
    each request's (start, length, ``KeyWork``) for the key hooks."""
    ids = input_ids.reshape(-1).tolist()
    per_layer: dict[int, list[Any]] = {}
    work: list[tuple[int, int, KeyWork]] = []
    for sequence in sequences:
        start, end = sequence.start, sequence.start + sequence.length
        past = len(sequence.reader)
        sequence.reader.read(ids[start:end])
        plans, lexical, pending, gated = compiled.lexical_plan([sequence.reader], past, sequence.selected)
        for layer, layer_plans in shifted(plans, start).items():
            per_layer.setdefault(layer, []).extend(layer_plans)
        if (compiled.keys or compiled.scopes) and sequence.length:
            valid = ~torch.isin(input_ids.reshape(1, -1)[:, start:end], special_ids)
            work.append((start, sequence.length, KeyWork(compiled, [sequence.reader], past, valid, lexical, pending,
                                                         sequence.selected, gated)))
    return per_layer, work


def read_packed(input_ids: torch.Tensor, sequences: Sequence[PackedSequence]) -> None:
    """Only read each request's new tokens (a forward with nothing to plan: the readers stay in step)."""
    ids = input_ids.reshape(-1).tolist()
    for sequence in sequences:
        sequence.reader.read(ids[sequence.start : sequence.start + sequence.length])


class RequestReaders:
    """One ``RowReader`` per request of an engine, kept across its forwards (thread-safe)."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = decoder_for(tokenizer)
        self._special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self._readers: dict[Hashable, RowReader] = {}
        self._lock = threading.Lock()

    def reader(self, key: Hashable, past: int, tokens: Callable[[], Sequence[int]] | None = None,
               keep: bool = True) -> RowReader:
        """The reader of request ``key`` having read its first ``past`` positions: the one kept, or one that
        reads them from ``tokens()`` (the request's tokens so far; unknown positions read as nothing), kept
        for the request's next forward unless ``keep`` is false."""
        with self._lock:
            reader = self._readers.get(key)
        if reader is not None and len(reader) == past:
            return reader
        history = list(tokens()) if tokens is not None else []
        if len(history) >= past:
            reader = RowReader(self._decode, self._special_ids)
            reader.read(history[:past])
        else:
            reader = RowReader.unread(self._decode, self._special_ids, past)
        if keep:
            with self._lock:
                self._readers[key] = reader
        return reader

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._readers.pop(key, None)

    def __len__(self) -> int:
        return len(self._readers)
