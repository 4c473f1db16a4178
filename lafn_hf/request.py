"""What to edit: ``LanguageEdit`` / ``EditGroup`` (one multilingual edit, the paper's group G, section 2.1),
read from JSON strictly (a language or key given twice is an error), and the one rule for what may be a
subject or an alias (``subject_problem``, ``surface_form_problem``)."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from dataclasses import dataclass
from typing import Any

import regex

from .stopwords import STOP_WORDS, is_stop_word
from .text import check_aliases, check_form_length, clean_subject, is_spaceless_char, is_word_char, nfc


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} ({value!r})")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return nfc(value)


@dataclass(frozen=True)
class LanguageEdit:
    """One language's side of an edit.

    Args:
        prompt: the question x_l^e. It should write ``subject``; where it does not (another language's
            name, a declension, a transliteration), ``edit()`` edits at the span it does write
            (``lafn_hf.editing.subject_span``; ``LafnConfig.subject_search``) and keeps ``subject`` as an alias.
        subject: the subject s_l; the last token of its span in ``prompt`` is where dV is added.
        target: the new answer y_l^e.
        paraphrases: rewrites of ``prompt`` forming the locating corpus C_l (Eq. 3). A paraphrase
            that does not contain the subject is still a valid sentence about the fact, so it is
            kept for locating (neuron counts use every token), with a warning.
        allow_common_subject: accept a subject that ``EditGroup`` would refuse as too short or too
            common (see ``subject_problem``). The edit then applies wherever the subject occurs.
        aliases: other names of the subject ("Eiffelturm", "La tour Eiffel", "the Iron Lady"): each routes
            to the edit wherever it occurs (any language), checked like the subject; they need not occur
            in the prompt. Typical sources: your own list, or a knowledge base's labels and aliases
            (Wikidata ``rdfs:label`` / ``skos:altLabel`` in every language).
    """

    prompt: str
    subject: str
    target: str
    paraphrases: tuple[str, ...] = ()
    allow_common_subject: bool = False
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _require_text("prompt", self.prompt))
        object.__setattr__(self, "subject", _require_text("subject", self.subject))
        check_form_length(self.subject, "subject")
        object.__setattr__(self, "target", _require_text("target", self.target))
        if isinstance(self.paraphrases, str) or not isinstance(self.paraphrases, (list, tuple)):
            raise TypeError(f"paraphrases must be a list of str, got {type(self.paraphrases).__name__}")
        paraphrases = tuple(_require_text(f"paraphrases[{i}]", p) for i, p in enumerate(self.paraphrases))
        object.__setattr__(self, "paraphrases", tuple(dict.fromkeys(paraphrases)))
        object.__setattr__(self, "aliases", check_aliases(self.aliases, "LanguageEdit"))
        if not isinstance(self.allow_common_subject, bool):
            raise TypeError(f"allow_common_subject must be a bool, got {type(self.allow_common_subject).__name__}")
        if not clean_subject(self.subject, fold=True):
            raise ValueError(f"subject {self.subject!r} has nothing to match: quotes, dashes and whitespace read as "
                             "spaces when matching")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LanguageEdit:
        if not isinstance(data, dict):
            raise TypeError(f"a language edit must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} in language edit; expected {sorted(known)}")
        as_tuple = {key: tuple(data[key]) for key in ("paraphrases", "aliases") if isinstance(data.get(key), list)}
        return cls(**{**data, **as_tuple})

    def to_dict(self) -> dict[str, Any]:
        data = {**dataclasses.asdict(self), "paraphrases": list(self.paraphrases), "aliases": list(self.aliases)}
        if not self.allow_common_subject:
            del data["allow_common_subject"]  # only written when opted in
        if not self.aliases:
            del data["aliases"]
        return data


@dataclass(frozen=True)
class EditGroup:
    """A multilingual edit group G = {l: (x_l^e, y_l^e)} with aligned subjects S_G."""

    edits: dict[str, LanguageEdit]

    def __post_init__(self) -> None:
        if not isinstance(self.edits, dict) or not self.edits:
            raise ValueError(f"an EditGroup needs at least one language, got {self.edits!r}")
        for lang, edit in self.edits.items():
            if not isinstance(lang, str) or not lang.strip() or lang != lang.strip():
                raise ValueError(f"language code must be a non-empty str without spaces, got {lang!r}")
            if not isinstance(edit, LanguageEdit):
                raise TypeError(f"edits[{lang!r}] must be a LanguageEdit, got {type(edit).__name__}")
            for name, language in ((edit.subject, lang), *((alias, None) for alias in edit.aliases)):
                problem = None if edit.allow_common_subject else surface_form_problem(name, language)
                if problem:
                    kind = "subject" if language is not None else "alias"
                    raise ValueError(
                        f"edits[{lang!r}]: {kind} {name!r} is refused: {problem}, and a bank subject edits every "
                        "prompt it occurs in. Set allow_common_subject=True on the LanguageEdit (JSON: "
                        '"allow_common_subject": true) to edit it anyway'
                    )

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.edits)

    @property
    def subjects(self) -> dict[str, str]:
        return {lang: edit.subject for lang, edit in self.edits.items()}

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every language's aliases, in order, without repeats."""
        return tuple(dict.fromkeys(alias for edit in self.edits.values() for alias in edit.aliases))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditGroup:
        """``{"en": {"prompt", "subject", "target", "paraphrases"}, "zh": {...}}``."""
        if not isinstance(data, dict):
            raise TypeError(f"an edit group must be a JSON object keyed by language, got {type(data).__name__}")
        return cls({lang: LanguageEdit.from_dict(edit) for lang, edit in data.items()})

    @classmethod
    def from_json(cls, text: str) -> EditGroup:
        """Parse JSON; a language key given twice (which ``json`` would silently merge) raises."""
        return cls.from_dict(json.loads(text, object_pairs_hook=_dict_without_duplicates))

    @classmethod
    def list_from_json(cls, text: str) -> list[EditGroup]:
        """A group file: one group or a list of groups. Errors name the group; a key given twice raises."""
        data = json.loads(text, object_pairs_hook=_KeysSeenTwice.from_pairs)
        if not isinstance(data, (dict, list)):
            raise ValueError(f"expected a JSON object {{language: edit}} or a list of them, got {type(data).__name__}")
        groups = []
        for number, raw in enumerate(data if isinstance(data, list) else [data]):
            try:
                _KeysSeenTwice.check(raw)
                groups.append(cls.from_dict(raw))
            except (TypeError, ValueError) as error:
                raise type(error)(f"group {number}: {error}") from error
        return groups

    def to_dict(self) -> dict[str, Any]:
        return {lang: edit.to_dict() for lang, edit in self.edits.items()}


def subject_problem(subject: str, language: str) -> str | None:
    """Why ``subject`` cannot be a bank subject in ``language``, or None.

    Refused: no letter or digit at all; fewer than 2 letters/digits unless all are of a script written
    without spaces (CJK, Thai, ...: one character is a word there); the whole subject being one of the
    language's most frequent function words (``lafn_hf.stopwords``, case-insensitive).
    """
    cleaned = clean_subject(subject).strip()
    if not any(unicodedata.category(char)[0] in "LN" for char in cleaned):
        return "it has no letter or digit"
    word_chars = [char for char in cleaned if is_word_char(char)]
    if len(word_chars) < 2 and not all(is_spaceless_char(char) for char in word_chars):
        return "it has fewer than 2 letters or digits (one character is only a word in CJK, Thai and similar scripts)"
    start = next(i for i, char in enumerate(cleaned) if is_word_char(char))
    end = max(i for i, char in enumerate(cleaned) if is_word_char(char)) + 1
    if is_stop_word(cleaned[start:end], language):
        return f"it is one of the most frequent function words of {language!r}"
    return None


def surface_form_problem(form: str, language: str | None) -> str | None:
    """Why ``form`` cannot route to an entry, or None: ``subject_problem`` in ``language`` for a subject, in every
    language with a list for an alias (``language`` None: aliases route in any language). The one rule of
    ``edit()``, ``add_aliases`` and the bank loader, decided at once for the usual name (a million a second)."""
    cleaned = form if form.isascii() else clean_subject(form)  # ASCII: NFC, nothing invisible
    if _TWO_LETTERS.search(cleaned):  # a letter or digit, twice: only a function word is refused
        span = _WORD_SPAN.search(cleaned)
        if span is None or nfc(span.group().casefold()) not in _ANY_STOP_WORD:
            return None
    languages = (language,) if language is not None else ("", *STOP_WORDS)
    return next(filter(None, (subject_problem(form, code) for code in languages)), None)


_TWO_LETTERS = regex.compile(r"[\p{L}\p{N}].*[\p{L}\p{N}]", regex.DOTALL)
_WORD_SPAN = regex.compile(r"[\p{L}\p{M}\p{N}\p{Pc}](?:.*[\p{L}\p{M}\p{N}\p{Pc}])?", regex.DOTALL)  # subject_problem's
_ANY_STOP_WORD = frozenset().union(*STOP_WORDS.values())


def _dict_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(_twice(key))
        result[key] = value
    return result


def _twice(key: str) -> str:
    return f"key {key!r} is given twice (language {key!r} is listed twice?)"


class _KeysSeenTwice(dict):  # type: ignore[type-arg]
    """A parsed JSON object that remembers the first key given twice, so the error can name its group."""

    twice: str | None = None

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = cls()
        for key, value in pairs:
            if key in result and result.twice is None:
                result.twice = key
            result[key] = value
        return result

    @staticmethod
    def check(value: Any) -> None:
        """Raise for the first key given twice anywhere inside ``value``."""
        if isinstance(value, _KeysSeenTwice) and value.twice is not None:
            raise ValueError(_twice(value.twice))
        if isinstance(value, (dict, list)):
            for child in value.values() if isinstance(value, dict) else value:
                _KeysSeenTwice.check(child)
