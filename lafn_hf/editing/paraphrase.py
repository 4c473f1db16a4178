"""The paraphrase set P_l used as locating corpus (paper section 2.3 and Appendix A), and word-dropped prompt variants."""

from __future__ import annotations

import random
import re
from typing import Any

import regex
import torch
from torch import nn

from ..routing.matcher import SubjectMatcher
from ..text import SPACELESS_CLASS, nfc

#: Appendix A, with the count and language filled in.
INSTRUCTION = (
    "You are an expert at sentence rewriting. Below I will give you a subject and a question containing the "
    "subject. Please give me {n} questions including this subject in {language}. They must have the same "
    "semantics as the given question. Subject: {subject}. Question containing this Subject: {question}"
)

_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)、:：]|\(\d+\))\s*")


def parse_paraphrases(text: str, subject: str, question: str) -> list[str]:
    """One paraphrase per line: list markers stripped, deduplicated, only lines containing the subject."""
    subject, question = nfc(subject), nfc(question)
    seen: dict[str, None] = {}
    for line in nfc(text).splitlines():
        candidate = _LIST_MARKER.sub("", line).strip().strip('"“”')
        if candidate and subject in candidate and candidate != question:
            seen.setdefault(candidate, None)
    return list(seen)


@torch.no_grad()
def generate_paraphrases(chat_model: nn.Module, tokenizer: Any, subject: str, question: str, n: int = 30,
                         language: str = "English", max_new_tokens: int = 1024) -> list[str]:
    """Ask a chat model (through its chat template) for ``n`` paraphrases of ``question``.

    Returns at most ``n`` distinct paraphrases that contain ``subject`` (NFC, exact); may return fewer.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if nfc(subject) not in nfc(question):
        raise ValueError(f"subject {subject!r} does not occur in question {question!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; pass an instruction-tuned (chat) model's tokenizer")
    message = INSTRUCTION.format(n=n, language=language, subject=subject, question=question)
    input_ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
    device = next(chat_model.parameters()).device
    output = chat_model.generate(  # type: ignore[operator]
        input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
        max_new_tokens=max_new_tokens, do_sample=False,
    )
    text = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    return parse_paraphrases(text, subject, question)[:n]


# One letter of a script written without spaces, or a run of word characters of other scripts
_WORD_UNIT = regex.compile(
    rf"(?=[\p{{L}}\p{{N}}]){SPACELESS_CLASS}|(?:(?!{SPACELESS_CLASS})[\p{{L}}\p{{M}}\p{{N}}\p{{Pc}}'’-])+")


def words_outside(text: str, matcher: SubjectMatcher) -> list[regex.Match[str]]:
    """The words of ``text`` (letters in scripts written without spaces) outside every mention
    that ``matcher`` finds."""
    mentions = [(found.start, found.end) for found in matcher.find(text)]
    return [word for word in _WORD_UNIT.finditer(text)
            if all(word.end() <= start or word.start() >= end for start, end in mentions)]


def word_dropped_variants(prompt: str, subject: str, count: int, seed: int = 0,
                          matcher: SubjectMatcher | None = None) -> list[str]:
    """Up to ``count`` rewrites of ``prompt``, each with one word outside ``subject`` left out (seeded choice).

    The subject is found as inference finds it (``SubjectMatcher``: "la torpille Mark 19" holds "Torpille Mark
    19"). A word is a run of word characters in spaced scripts and one letter in scripts written without
    spaces (``text.SPACELESS_CLASS``); a prompt with one word besides the subject has none. Cheap,
    deterministic question variants: training dV on them as well as on the prompt asks it to work when the
    words around the subject change, as they do in rephrasings. ``matcher``: the subject's, when already built
    (``PreparedEdit``).
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, got {type(count).__name__} ({count!r})")
    if count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    matcher = matcher if matcher is not None else SubjectMatcher([subject])
    if not matcher.find(prompt):
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r} as the matcher reads it")
    spans = [word.span() for word in words_outside(prompt, matcher)]
    chosen = sorted(random.Random(seed).sample(spans, min(count, len(spans)))) if len(spans) > 1 else []
    variants = []
    for low, high in chosen:
        if prompt[low - 1 : low] == " ":
            low -= 1
        elif prompt[high : high + 1] == " ":
            high += 1
        variants.append(prompt[:low] + prompt[high:])
    return list(dict.fromkeys(v for v in variants if v != prompt and matcher.find(v)))
