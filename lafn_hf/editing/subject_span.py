"""Find where each language's prompt writes the edit's subject, when it does not write it as given.

A multilingual dataset's subject field is often not what its question writes: the French side of an item
gives "Appelle le docteur" and asks about "Call the Doctor"; Russian declines ("Лукреции Борджиа" for
"Лукреция Борджиа"); Thai transliterates; names differ by a space ("VolvoB12M" / "Volvo B12M"). The edit is
made at the last token of the span the prompt does write, found in this order (the first stage that finds
one decides):

1. ``written``: the subject as given (the matcher's folded, whole-word rule), then its own aliases;
2. ``other``: another language's subject or alias of the same group ("Call the Doctor" in the French prompt);
3. ``lexical``: any of those names with word endings changed, words reordered or derived, or a Thai/Lao/...
   name spelled another way (the routing's lexical stages: ``lafn_hf.routing.inflection``, ``reorder``, ``spelling``);
4. ``aligned``: the run of the prompt's words most similar to any of those names after transliteration to
   Latin letters (``anyascii``), case folding and dropping everything but letters and digits, by
   ``rapidfuzz``'s normalised Indel similarity (0-100), when at least the threshold.

The span becomes the language's subject (where dV is added, and a bank subject); the given form is kept as an
alias so questions that write it still route to the edit. ``LafnConfig.subject_search`` stops after a stage
("written" is the strict rule of earlier versions).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import regex
from anyascii import anyascii
from rapidfuzz.distance import Indel

from ..config import SUBJECT_SEARCHES
from ..request import EditGroup, LanguageEdit, subject_problem
from ..routing.matcher import SubjectMatch, SubjectMatcher
from ..stopwords import is_stop_word
from ..text import is_spaceless_char, nfc

logger = logging.getLogger(__name__)

# A run of word characters, with inner apostrophes, hyphens, full stops and slashes ("Mor'du", "Nassau-Dillenburg",
# "IUPAC/IUPAP"), or one character of a script written without spaces (with its combining marks).
_TOKEN = regex.compile(r"(?:[\p{L}\p{N}][\p{M}]*)+(?:['’\-./](?:[\p{L}\p{N}][\p{M}]*)+)*\.?")
_GRAPHEME = regex.compile(r"\X")
# Alignment similarity (0-100) a span needs: chosen on MzsRE dev (items 400-742 of the test files, 11 languages
# against English), where spans from 65 up were the subject (or ended at its last word) in all but about 12 of
# 3,430 language-edits, and below it mostly were not (docs/subject-spans.md).
DEFAULT_THRESHOLD = 65.0
_EXTRA_TOKENS = 2  # an aligned span may be this many tokens longer than the name it is compared with


@dataclass(frozen=True)
class SubjectSpan:
    """Where one language's prompt writes its subject: characters [start, end) of the prompt.

    ``how``: the stage that found it (``SUBJECT_SEARCHES``); ``source``: the name it was found from (the given subject,
    an alias, or another language's subject, with that language: "Call the Doctor (en)"); ``score``: the
    alignment similarity (100 for the other stages)."""

    language: str
    given: str
    text: str
    start: int
    end: int
    how: str
    source: str
    score: float = 100.0

    def __repr__(self) -> str:
        found = "" if self.how == "written" else f" <- {self.source!r} {self.how}"
        if self.how == "aligned":
            found += f" {self.score:.0f}"
        return f"SubjectSpan({self.language}: {self.text!r}{found})"


class SubjectNotFoundError(ValueError):
    """No plausible span of the prompt writes the subject; ``closest`` is the best candidate there was."""

    def __init__(self, message: str, closest: SubjectSpan | None) -> None:
        super().__init__(message)
        self.closest = closest


def alignment_key(text: str) -> str:
    """What alignment compares: Latin transliteration, case-folded, letters and digits only."""
    return "".join(char for char in anyascii(nfc(text)).casefold() if char.isalnum())


@functools.lru_cache(maxsize=4096)
def _cached_key(text: str) -> str:
    return alignment_key(text)


def _tokens(prompt: str) -> list[tuple[int, int]]:
    """The prompt's word tokens as (start, end): words of spaced scripts, single graphemes of spaceless ones."""
    spans = []
    for match in _TOKEN.finditer(prompt):
        if is_spaceless_char(match.group()[0]):
            spans += [(match.start() + g.start(), match.start() + g.end()) for g in _GRAPHEME.finditer(match.group())]
        else:
            spans.append(match.span())
    return spans


def _trimmed(prompt: str, start: int, end: int) -> tuple[int, int]:
    """Drop a trailing full stop that ends the sentence, not an initial ("W." in "Mira W." stays)."""
    if prompt[end - 1] == "." and end - start > 2 and prompt[end - 3 : end - 1].isalpha():
        end -= 1
    return start, end


def _size(name: str) -> int:
    """Tokens a name spans in a prompt: its words, or its graphemes in scripts written without spaces."""
    return max(1, len(_tokens(name)))


def _edge_fits(prompt: str, first: tuple[int, int], last: tuple[int, int], name_keys: Sequence[str],
               language: str) -> bool:
    """Keep words beside the subject out of its span: neither end may be a function word of ``language`` that
    the name lacks, and the last word (where dV goes) must resemble a word of the name (similarity >= 0.4);
    characters of scripts written without spaces pass the second rule."""
    for start, end in {first, last}:
        key = _cached_key(prompt[start:end])
        if is_stop_word(prompt[start:end], language) and key not in name_keys:
            return False
    token = prompt[last[0] : last[1]]
    return is_spaceless_char(token[0]) or any(
        Indel.normalized_similarity(_cached_key(token), word) >= 0.4 for word in name_keys)


def align(prompt: str, names: Sequence[tuple[str, str]], language: str, given: str = "",
          strict: bool = True) -> SubjectSpan | None:
    """The run of ``prompt``'s tokens most similar to any of ``names`` ((name, source) pairs), or None.

    Ties go to the shorter span, then the earlier one. A span that could not be a subject (a function word,
    a single letter: ``subject_problem``), or whose ends break ``_edge_fits``, is never chosen (with ``strict``;
    without, only for naming the closest candidate in an error)."""
    tokens = _tokens(prompt)
    best: tuple[float, int, int, int, str] | None = None
    for name, source in names:
        key = _cached_key(name)
        if not key:
            continue
        token_keys = [_cached_key(name[a:b]) for a, b in _tokens(name)]
        for first in range(len(tokens)):
            for last in range(first, min(first + _size(name) + _EXTRA_TOKENS, len(tokens))):
                start, end = _trimmed(prompt, tokens[first][0], tokens[last][1])
                score = Indel.normalized_similarity(key, _cached_key(prompt[start:end])) * 100
                rank = (score, -(end - start), -start)
                better = best is None or rank > best[:3]
                if better and (not strict or _edge_fits(prompt, tokens[first], tokens[last], token_keys, language)
                               and subject_problem(prompt[start:end], language) is None):
                    best = (score, -(end - start), -start, end, source)
    if best is None:
        return None
    score, _, negative_start, end, source = best
    start = -negative_start
    return SubjectSpan(language, given, prompt[start:end], start, end, "aligned", source, round(score, 1))


def spans_metadata(spans: dict[str, SubjectSpan]) -> dict[str, dict[str, object]]:
    """What an entry's metadata records of ``spans``: the languages whose prompt did not write the given subject."""
    return {lang: {"given": span.given, "span": span.text, "how": span.how, "source": span.source,
                   "score": span.score} for lang, span in spans.items() if span.how != "written"}


def _longest(matches: Sequence[SubjectMatch]) -> SubjectMatch | None:
    return max(matches, key=lambda m: (m.end - m.start, -m.start), default=None)


def _exact(prompt: str, names: Sequence[tuple[str, str]], lexical: bool) -> tuple[SubjectMatch, str] | None:
    """The longest mention of any name (with ``lexical``, also inflected, reordered or spelled another way)."""
    usable = [(name, source) for name, source in names if name.strip()]
    if not usable:
        return None
    plain = [name for name, _ in usable]
    matcher = SubjectMatcher(plain, inflected=plain if lexical else (), spellings=lexical)
    found = _longest(matcher.find(prompt))
    if found is None:
        return None
    return found, dict(usable)[found.subject]


def _names(group: EditGroup, language: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(this language's subject and aliases, the other languages' subjects and aliases) as (name, source)."""
    own = group.edits[language]
    mine = [(own.subject, own.subject), *((alias, f"{alias} (alias)") for alias in own.aliases)]
    seen = {name for name, _ in mine}
    others = []
    for lang, edit in group.edits.items():
        for name in (edit.subject, *edit.aliases) if lang != language else ():
            if name not in seen:
                seen.add(name)
                others.append((name, f"{name} ({lang})"))
    return mine, others


def find_span(group: EditGroup, language: str, search: str = "aligned", threshold: float = DEFAULT_THRESHOLD) -> SubjectSpan:
    """Where ``group``'s ``language`` prompt writes the subject (module docstring), searching up to stage
    ``search``; ``SubjectNotFoundError`` (a ``ValueError`` naming the closest candidate span) when none does."""
    if search not in SUBJECT_SEARCHES:
        raise ValueError(f"search must be one of {SUBJECT_SEARCHES}, got {search!r}")
    edit = group.edits[language]
    prompt = edit.prompt
    mine, others = _names(group, language)
    stages = [("written", mine, False), ("other", others, False), ("lexical", mine + others, True)]
    for how, names, lexical in stages[: SUBJECT_SEARCHES.index(search) + 1]:
        found = _exact(prompt, names, lexical)
        if found is not None:
            match, source = found
            if how == "written" and match.subject != edit.subject:
                how = "alias"
            return SubjectSpan(language, edit.subject, prompt[match.start : match.end], match.start, match.end,
                               how, source)
    closest = align(prompt, mine + others, language, edit.subject)
    if search == "aligned" and closest is not None and closest.score >= threshold:
        return closest
    closest = closest or align(prompt, mine + others, language, edit.subject, strict=False)
    raise SubjectNotFoundError(_not_found(edit, language, search, threshold, closest), closest)


def _not_found(edit: LanguageEdit, language: str, search: str, threshold: float, closest: SubjectSpan | None) -> str:
    message = f"language {language!r}: subject {edit.subject!r} does not occur in prompt {edit.prompt!r}"
    if search != "written":
        message += " (nor another language's subject or alias, inflected, reordered or spelled another way)"
    if closest is not None:
        message += (f"; the closest span is {closest.text!r} (similar to {closest.source!r}: {closest.score:.0f} of "
                    f"100{'' if search != 'aligned' else f', below the threshold {threshold:g}'})")
    return message + ". Give the subject as the prompt writes it, or add that form to the language's aliases"


def _with_span(edit: LanguageEdit, span: SubjectSpan, language: str) -> LanguageEdit:
    """``edit`` made at ``span``: the span is the subject, the given form an alias (where it could be one)."""
    if span.text == edit.subject:
        return edit
    keep = edit.allow_common_subject or subject_problem(edit.subject, language) is None
    aliases = tuple(dict.fromkeys(a for a in (*edit.aliases, *([edit.subject] if keep else [])) if a != span.text))
    log = logger.warning if span.how == "aligned" else logger.info
    log("language %r: subject %r is edited at %r (LafnConfig.subject_search)", language, edit.subject, span)
    return dataclasses.replace(edit, subject=span.text, aliases=aliases)


def _warn_lacking(edit: LanguageEdit, language: str) -> None:
    matcher = SubjectMatcher([edit.subject, *edit.aliases])
    lacking = [p for p in edit.paraphrases if not matcher.find(p)]
    if lacking:
        logger.warning("language %r: %d paraphrase(s) lack subject %r (as a whole word); they are used for locating "
                       "only: %r", language, len(lacking), edit.subject, lacking[:3])


def resolve_languages(group: EditGroup, search: str = "aligned", threshold: float = DEFAULT_THRESHOLD
                      ) -> tuple[EditGroup | None, dict[str, SubjectSpan], dict[str, SubjectNotFoundError]]:
    """(``group`` made at the span each language's prompt writes, of the languages where one was found (None if
    none), those spans, and for each other language why not). The given subject stays an alias."""
    spans: dict[str, SubjectSpan] = {}
    missing: dict[str, SubjectNotFoundError] = {}
    for lang in group.edits:
        try:
            spans[lang] = find_span(group, lang, search, threshold)
        except SubjectNotFoundError as error:
            missing[lang] = error
    edits = {lang: _with_span(group.edits[lang], span, lang) for lang, span in spans.items()}
    for lang, edit in edits.items():
        _warn_lacking(edit, lang)
    if not edits:
        return None, spans, missing
    unchanged = len(edits) == len(group.edits) and all(edits[lang] is group.edits[lang] for lang in edits)
    return (group if unchanged else EditGroup(edits)), spans, missing


def resolve_group(group: EditGroup, search: str = "aligned", threshold: float = DEFAULT_THRESHOLD
                  ) -> tuple[EditGroup, dict[str, SubjectSpan]]:
    """``resolve_languages``, strict: every language must be found, else its ``SubjectNotFoundError``."""
    resolved, spans, missing = resolve_languages(group, search, threshold)
    if missing:
        raise next(iter(missing.values()))
    if resolved is None:  # only for a group without languages, which EditGroup refuses
        raise ValueError("the group has no language")
    return resolved, spans
