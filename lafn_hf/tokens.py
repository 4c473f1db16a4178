"""Small tokenisation helpers shared by locating, optimising and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Scripts written without spaces between words: CJK, kana, Thai, Lao, Khmer, Myanmar, fullwidth forms.
_NO_SPACE_RANGES = (
    (0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3000, 0x30FF),
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF), (0x20000, 0x2FFFF),
)


def _no_space_script(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _NO_SPACE_RANGES)


def target_separator(prompt: str, target: str) -> str:
    """" " between a prompt and its answer, unless one already has the space or the script uses none."""
    if not prompt or not target or prompt[-1].isspace() or target[0].isspace():
        return ""
    return "" if _no_space_script(prompt[-1]) or _no_space_script(target[0]) else " "


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


def char_ends(offsets: Sequence[Sequence[int]]) -> list[int]:
    """Running maximum of each token's character end (special tokens have (0, 0))."""
    ends, running = [], 0
    for _, end in offsets:
        running = max(running, int(end))
        ends.append(running)
    return ends
