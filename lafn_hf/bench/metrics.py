"""Scores a user would recognise for generated answers, beside the Bi-ZsRE token F1.

- ``normalize_answer``: NFKC, casefold, every punctuation character (Unicode category P*) replaced by a
  space, whitespace runs collapsed to one space, stripped. "  The Sopwith-Company." -> "the sopwith company".
- ``answer_hit``: the normalised target is the start of the normalised answer and, in scripts written with
  spaces, ends at a word boundary there ("Rome" hits "Rome, Italy" but not "Romeo").
- ``contains``: the normalised target occurs anywhere in the normalised answer (same word-boundary rule).
- ``same_answer``: Locality's test, the edited answer equals the unedited one after normalisation.
- ``token_f1``: the Bi-ZsRE token-level F1 over token-id multisets (``lafn_hf.evaluate.token_f1``).
"""

from __future__ import annotations

import unicodedata

from ..evaluate import token_f1
from ..text import needs_word_boundary

__all__ = ["answer_hit", "contains", "normalize_answer", "same_answer", "token_f1"]


def normalize_answer(text: str) -> str:
    """NFKC + casefold, punctuation to spaces, whitespace collapsed and stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(char).startswith("P") else char for char in text)
    return " ".join(text.split())


def _bounded(answer: str, target: str, start: int) -> bool:
    """Whether ``target`` at ``answer[start:]`` is not glued to letters/digits of a spaced script."""
    end = start + len(target)
    before = start > 0 and needs_word_boundary(answer[start - 1]) and needs_word_boundary(target[0])
    after = end < len(answer) and needs_word_boundary(answer[end]) and needs_word_boundary(target[-1])
    return not (before or after)


def answer_hit(answer: str, target: str) -> bool:
    """The normalised ``target`` starts the normalised ``answer`` (an empty target never hits)."""
    answer, target = normalize_answer(answer), normalize_answer(target)
    return bool(target) and answer.startswith(target) and _bounded(answer, target, 0)


def contains(answer: str, target: str) -> bool:
    """The normalised ``target`` occurs in the normalised ``answer`` as a whole word (spaced scripts)."""
    answer, target = normalize_answer(answer), normalize_answer(target)
    if not target:
        return False
    start = answer.find(target)
    while start >= 0:
        if _bounded(answer, target, start):
            return True
        start = answer.find(target, start + 1)
    return False


def same_answer(answer: str, unedited: str) -> bool:
    """Locality: both answers are equal after ``normalize_answer``."""
    return normalize_answer(answer) == normalize_answer(unedited)
