"""Paraphrases written by the edited model itself: a few-shot "same question in other words" prompt per language,
sampled with a seed, kept where the subject still occurs. The paper asks a 14B chat model for 30 (Appendix A);
offline there is none, and even a 270M base model rewrites questions well enough from three examples."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..config import LafnConfig
from ..request import EditGroup
from ..routing.matcher import SubjectMatcher
from ..text import nfc
from ..tokens import encode_texts, sample_top_k, stop_ids
from .paraphrase import words_outside
from .preflight import answered_length, context_limit

logger = logging.getLogger(__name__)

#: Per language: the question label, the rewrite label and three hand-written (question, rewrite) pairs
#: about facts outside MzsRE. Languages missing here get no written paraphrases.
REWRITE_SHOTS: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    "en": ("Question:", "Same question in other words:", (
        ("Who directed the film Casablanca?", "Casablanca was directed by whom?"),
        ("In which city was Marie Curie born?", "Where is the birthplace of Marie Curie?"),
        ("What language does Ruth Fischer speak?", "Which language is spoken by Ruth Fischer?"))),
    "de": ("Frage:", "Dieselbe Frage mit anderen Worten:", (
        ("Wer führte Regie bei dem Film Casablanca?", "Von wem wurde der Film Casablanca inszeniert?"),
        ("In welcher Stadt wurde Marie Curie geboren?", "Wo ist der Geburtsort von Marie Curie?"),
        ("Welche Sprache spricht Ruth Fischer?", "Welche Sprache wird von Ruth Fischer gesprochen?"))),
    "es": ("Pregunta:", "La misma pregunta con otras palabras:", (
        ("¿Quién dirigió la película Casablanca?", "¿La película Casablanca fue dirigida por quién?"),
        ("¿En qué ciudad nació Marie Curie?", "¿Cuál es el lugar de nacimiento de Marie Curie?"),
        ("¿Qué idioma habla Ruth Fischer?", "¿Qué idioma es hablado por Ruth Fischer?"))),
    "fr": ("Question :", "La même question autrement :", (
        ("Qui a réalisé le film Casablanca ?", "Le film Casablanca a été réalisé par qui ?"),
        ("Dans quelle ville Marie Curie est-elle née ?", "Quel est le lieu de naissance de Marie Curie ?"),
        ("Quelle langue parle Ruth Fischer ?", "Quelle langue est parlée par Ruth Fischer ?"))),
    "zh": ("问题：", "换一种说法：", (
        ("电影《卡萨布兰卡》的导演是谁？", "谁执导了电影《卡萨布兰卡》？"),
        ("玛丽·居里出生在哪个城市？", "玛丽·居里的出生地是哪里？"),
        ("鲁思·菲舍尔说什么语言？", "鲁思·菲舍尔使用哪种语言？"))),
}

#: Candidates sampled per paraphrase wanted (many repeat the question or drop the subject).
CANDIDATES_PER_PARAPHRASE = 3


def rewrite_prompt(language: str, question: str) -> str:
    """The few-shot text whose continuation is a rewrite of ``question`` (``language`` must have shots)."""
    asked, rewritten, shots = REWRITE_SHOTS[language]
    examples = "".join(f"{asked} {q}\n{rewritten} {p}\n\n" for q, p in shots)
    return f"{examples}{asked} {question}\n{rewritten}"


def _other_words(text: str, matcher: SubjectMatcher) -> set[str]:
    """The casefolded words of ``text`` outside the subject's mentions (letters in scripts without spaces)."""
    return {word.group().casefold() for word in words_outside(text, matcher)}


def pick_paraphrases(candidates: list[str], prompt: str, subject: str, count: int) -> list[str]:
    """The first ``count`` distinct candidates' first lines that hold ``subject`` (as inference matches it),
    differ from ``prompt``, end as a question does, are at most twice as long as it and keep at least half
    of its words besides the subject (a rewrite that asks about something else seldom does)."""
    matcher = SubjectMatcher([subject])
    asked = _other_words(prompt, matcher)
    seen = {prompt.casefold()}
    picked: list[str] = []
    for candidate in candidates:
        line = nfc(candidate.split("\n", 1)[0].strip())
        if (line.casefold() in seen or not line.endswith(("?", "？")) or len(line) > 2 * len(prompt)
                or not matcher.find(line) or 2 * len(asked & _other_words(line, matcher)) < len(asked)):
            continue
        seen.add(line.casefold())
        picked.append(line)
        if len(picked) == count:
            break
    return picked


def newline_ids(tokenizer: Any) -> list[int]:
    """The tokens that are one or two line breaks alone (a written paraphrase ends at the first)."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("\n", "\n\n")]
    return [ids[0] for ids in encoded if len(ids) == 1]


@torch.no_grad()
def write_paraphrases(model: nn.Module, tokenizer: Any, group: EditGroup, config: LafnConfig) -> EditGroup:
    """``group`` with ``config.write_paraphrases`` model-written paraphrases given to each language's edit that
    has none and has shots in ``REWRITE_SHOTS`` (fewer where fewer candidates qualify); unchanged otherwise.
    Written whatever the locate strategy: a representation routing key reads them too. Nothing is written
    where the rewrite request cannot fit the model's positions, and no paraphrase is kept that cannot be
    trained with its target (``train_paraphrases``)."""
    wanted = [lang for lang, edit in group.edits.items() if not edit.paraphrases and lang in REWRITE_SHOTS]
    if config.write_paraphrases == 0 or not wanted:
        return group
    found = context_limit(model, tokenizer)
    limit = found[0] if found else None
    longest = max(len(tokenizer(group.edits[lang].prompt)["input_ids"]) for lang in wanted)
    new_tokens = 2 * longest + 8
    texts = {lang: rewrite_prompt(lang, group.edits[lang].prompt) for lang in wanted}
    if limit is not None:
        fitting = [lang for lang in wanted if len(tokenizer(texts[lang])["input_ids"]) + new_tokens <= limit]
        if len(fitting) < len(wanted):
            logger.info("no paraphrases written for %s: the rewrite request does not fit %d positions",
                        [lang for lang in wanted if lang not in fitting], limit)
        wanted = fitting
        if not wanted:
            return group
    device = next(model.parameters()).device
    input_ids, attention_mask = encode_texts(tokenizer, [texts[lang] for lang in wanted], device, left=True)
    per_row = CANDIDATES_PER_PARAPHRASE * config.write_paraphrases
    output = sample_top_k(model, tokenizer, input_ids, attention_mask, config.seed, new_tokens, per_row=per_row,
                          stops=[*stop_ids(tokenizer, getattr(model, "generation_config", None)), *newline_ids(tokenizer)])
    new = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    edits = dict(group.edits)
    for i, lang in enumerate(wanted):
        edit = group.edits[lang]
        picked = [p for p in pick_paraphrases(new[i * per_row : (i + 1) * per_row], edit.prompt, edit.subject, per_row)
                  if limit is None or answered_length(tokenizer, p, edit.target) <= limit][: config.write_paraphrases]
        logger.debug("paraphrases written for %s (%s): %r", edit.subject, lang, picked)
        edits[lang] = dataclasses.replace(edit, paraphrases=tuple(picked))
    return dataclasses.replace(group, edits=edits)


__all__ = ["REWRITE_SHOTS", "pick_paraphrases", "rewrite_prompt", "write_paraphrases"]
