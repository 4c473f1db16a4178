"""Small tokenisation helpers shared by locating, optimising and evaluation."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .text import is_spaceless_char, is_word_char


def target_separator(prompt: str, target: str) -> str:
    """" " between a prompt and its answer, unless one already has the space or the script uses none."""
    if not prompt or not target or prompt[-1].isspace() or target[0].isspace():
        return ""
    return "" if is_spaceless_char(prompt[-1]) or is_spaceless_char(target[0]) else " "


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else eos, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_batch(rows: Sequence[Sequence[int]], padding_id: int, device: torch.device | str = "cpu",
              left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of shape (B, T), padded on the right (or left)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), padding_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def encode_texts(tokenizer: Any, texts: Sequence[str], device: torch.device | str = "cpu",
                 left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise (with the tokenizer's special tokens, as inference does) and pad."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    return pad_batch(rows, pad_id(tokenizer), device, left=left)


def stop_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """Token ids that end an answer: the tokenizer's EOS and every EOS of the generation config (Gemma-3 and
    instruct models list several; ``generate()`` stops at each of them)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return frozenset(int(i) for i in ids if i is not None)


def sample_top_k(model: Any, tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int,
                 new_tokens: int, exact_length: bool = False, per_row: int = 1,
                 stops: Sequence[int] | None = None) -> torch.Tensor:
    """The model's own seeded top-k 5 continuations of each row (``per_row`` each; ``exact_length``: never
    shorter than ``new_tokens``; ``stops``: the tokens that end a row, default the model's EOS), prompt
    included; the global RNG is left as it was."""
    device = input_ids.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output: torch.Tensor = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=5, top_p=1.0, temperature=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact_length else None,
            num_return_sequences=per_row, pad_token_id=pad_id(tokenizer),
            **({"eos_token_id": list(stops)} if stops is not None else {}),
        )
    return output


_CONTINUATIONS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()
_CONTINUATIONS_LOCK = threading.Lock()


def word_continuations(tokenizer: Any) -> torch.Tensor:
    """(vocabulary,) bool, on CPU: the tokens that, read after a word, continue it (their text starts with a
    letter, mark or digit and no space: "er" after "Krieg" reads "Krieger"; "▁Krieg", "Ġwar", ",", EOS end it).
    Decoded after a fixed word so that no decoder strips a leading space; memoised per tokenizer (0.6 s for
    Gemma 3's 262k pieces)."""
    with _CONTINUATIONS_LOCK:
        cached = _CONTINUATIONS.get(tokenizer)
    if cached is not None:
        return cached
    reference = list(tokenizer("a", add_special_tokens=False)["input_ids"])[-1:]
    size = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.decoder is not None:
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        first = tokenizer.convert_ids_to_tokens(reference)
        decode = backend.decoder.decode
        start = len(decode(first))
        texts = [decode([*first, piece])[start:] if piece is not None else "" for piece in pieces]
    else:
        start = len(tokenizer.decode(reference))
        texts = [tokenizer.decode([*reference, i])[start:] for i in range(size)]
    mask = torch.tensor([bool(text) and is_word_char(text[0]) for text in texts], dtype=torch.bool)
    with _CONTINUATIONS_LOCK:
        _CONTINUATIONS[tokenizer] = mask
    return mask
