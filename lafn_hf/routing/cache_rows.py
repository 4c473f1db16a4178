"""What each sequence has read, carried on its own KV cache so later turns and decoding steps continue it.

The readers (``lafn_hf.routing.row_reader.RowReader``, one per batch row) are stored on the transformers ``Cache``
object that holds the same sequences, so they belong to that call or chat session and never to a shared
object. The cache's own batch operations (beam-search reordering, cropping, repeating, selecting rows,
reset) are mirrored on the readers by wrapping those methods on that one cache instance; a copied cache
(``copy.deepcopy``) copies its readers and rebinds the wrappers to the copy.

When a cache holds positions its readers do not account for (it was filled elsewhere), the readers start
afresh at the new tokens: subjects split across that boundary are not seen.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable, Sequence, Set
from typing import Any

from .row_reader import RowReader

logger = logging.getLogger(__name__)
_READERS = "_lafn_row_readers"
_WRAPPED = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices", "reset")


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache a model forward was called with: ``cache=`` (what ``generate()`` passes in recent
    transformers 5.x, e.g. 5.24) or its older name ``past_key_values=``."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def cache_keyword(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` where the forward names it (transformers
    5.2x on, where ``past_key_values=`` is a deprecated alias, to be removed in 5.40), else ``past_key_values``
    (transformers 5.0 and models whose forward does not name ``cache``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a model forward returned (``output.cache`` or the older ``output.past_key_values``), read
    without touching transformers' deprecated alias; ``None`` for tuple outputs and outputs without one."""
    fields = getattr(output, "__dict__", {})
    cache = fields.get("cache")
    return fields.get("past_key_values") if cache is None else cache


def cache_length(cache: Any) -> int:
    """Positions already in ``cache`` (0 for ``None`` or an empty cache)."""
    if cache is None:
        return 0
    get_length = getattr(cache, "get_seq_length", None)
    return int(get_length()) if get_length is not None else 0


def readers_for(cache: Any, batch: int, past: int, decode: Callable[[list[int]], str],
                special_ids: Set[int]) -> list[RowReader]:
    """The readers to continue for a forward over new tokens after ``past`` cached positions."""
    stored = getattr(cache, _READERS, None) if cache is not None else None
    if stored is not None and len(stored) == batch and all(len(r) == past for r in stored):
        return list(stored)
    if past:
        logger.debug("the KV cache holds %d positions this wrapper did not read; matching starts afresh", past)
    return [RowReader.unread(decode, special_ids, past) for _ in range(batch)]


def keep_readers(cache: Any, readers: Sequence[RowReader]) -> None:
    """Store ``readers`` on ``cache`` (a transformers Cache), wrapping its batch operations once."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return
    try:
        setattr(cache, _READERS, list(readers))
        for name in _WRAPPED:
            method = getattr(type(cache), name, None)
            if method is not None and not isinstance(cache.__dict__.get(name), types.MethodType):
                setattr(cache, name, types.MethodType(_MIRRORS[name], cache))
    except (AttributeError, TypeError) as error:  # a cache class that takes no attributes
        logger.debug("cannot keep subject readers on %s: %s", type(cache).__name__, error)


def _readers(cache: Any) -> list[RowReader]:
    return list(getattr(cache, _READERS, None) or [])


def _select_readers(cache: Any, rows: Any) -> None:
    """Readers of ``rows`` (a tensor of row indices, repeats allowed: each gets its own copy)."""
    readers = _readers(cache)
    if readers:
        setattr(cache, _READERS, [readers[int(i)].clone() for i in rows.tolist()])


def _reorder_cache(cache: Any, beam_idx: Any) -> Any:
    result = type(cache).reorder_cache(cache, beam_idx)
    _select_readers(cache, beam_idx)
    return result


def _crop(cache: Any, tokens_to_remove: int) -> Any:
    result = type(cache).crop(cache, tokens_to_remove)
    _truncate_to(cache, cache_length(cache))
    return result


def _batch_repeat_interleave(cache: Any, repeats: int) -> Any:
    result = type(cache).batch_repeat_interleave(cache, repeats)
    setattr(cache, _READERS, [reader.clone() for reader in _readers(cache) for _ in range(repeats)])
    return result


def _batch_select_indices(cache: Any, indices: Any) -> Any:
    result = type(cache).batch_select_indices(cache, indices)
    _select_readers(cache, indices)
    return result


def _reset(cache: Any) -> Any:
    result = type(cache).reset(cache)
    setattr(cache, _READERS, None)
    return result


def _truncate_to(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of every reader (re-read, so the text is exactly that prefix)."""
    readers = _readers(cache)
    if readers and any(len(r) > length for r in readers):
        setattr(cache, _READERS, [reader.prefix(length) for reader in readers])


_MIRRORS: dict[str, Callable[..., Any]] = {
    "reorder_cache": _reorder_cache,
    "crop": _crop,
    "batch_repeat_interleave": _batch_repeat_interleave,
    "batch_select_indices": _batch_select_indices,
    "reset": _reset,
}
