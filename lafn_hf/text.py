"""Unicode text rules shared by editing and matching: scripts, word characters, matching normalisation.

Character classes come from the ``regex`` package (Unicode scripts and properties, kept current with the
Unicode standard; already a dependency of transformers), not from hand-written code-point ranges.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence

import regex

# Scripts written without spaces between words (or with particles attached to words, as Hangul): a subject
# written in them is matched as a plain substring; other scripts need word boundaries around the subject.
SPACELESS_CLASS = (
    r"[\p{Script=Han}\p{Script=Hiragana}\p{Script=Katakana}\p{Script=Hangul}\p{Script=Thai}\p{Script=Lao}"
    r"\p{Script=Khmer}\p{Script=Myanmar}\p{Script=Tibetan}\p{Script=Javanese}\p{Script=Balinese}"
    r"\p{Block=Halfwidth_and_Fullwidth_Forms}\p{Block=CJK_Symbols_and_Punctuation}]"
)
_SPACELESS = regex.compile(SPACELESS_CLASS)
_WORD = regex.compile(r"[\p{L}\p{M}\p{N}\p{Pc}]")
# Invisible characters that may sit inside a word without changing it: zero-width space/joiners, word
# joiner, BOM, soft hyphen, Mongolian vowel separator. Removed before matching.
_IGNORABLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e")
_HAS_IGNORABLE = regex.compile("[" + "".join(sorted(_IGNORABLE)) + "]")


def nfc(text: str) -> str:
    """NFC-normalise ``text`` (prompts, subjects and matched inputs are compared in NFC)."""
    return unicodedata.normalize("NFC", text)


def is_spaceless_char(char: str) -> bool:
    """True for characters of scripts written without spaces between words (CJK, Thai, ...)."""
    return bool(_SPACELESS.match(char))


def is_word_char(char: str) -> bool:
    """Letters, marks, digits and connector punctuation of any script."""
    return bool(_WORD.match(char))


def needs_word_boundary(char: str) -> bool:
    """A subject that starts/ends with ``char`` needs a word boundary on that side (spaced scripts only)."""
    return is_word_char(char) and not is_spaceless_char(char)


def normalize_for_matching(text: str, fold: bool = False) -> tuple[str, Sequence[int]]:
    """(normalised text, raw end index of each normalised character).

    Drops invisible characters (zero-width space/joiners, soft hyphen, ...) and NFC-composes each run that
    starts at a character of canonical combining class 0. With ``fold`` each such run is also folded
    (``fold_cluster``: NFKC, case-folded, accents dropped in Latin/Greek/Cyrillic, apostrophe variants
    unified, quotes, dashes and any whitespace a space) and runs of spaces collapse into one. ``ends[i]`` is the index
    just past the raw characters that produced normalised character ``i``, so a match ending at normalised
    index ``j`` ends at raw index ``ends[j - 1]``.
    """
    if fold:
        return _folded(text)
    if unicodedata.is_normalized("NFC", text) and not _HAS_IGNORABLE.search(text):
        return text, range(1, len(text) + 1)  # the common case: nothing to change
    out: list[str] = []
    ends: list[int] = []
    run: list[str] = []
    run_end = 0

    def flush() -> None:
        if run:
            composed = nfc("".join(run))
            out.append(composed)
            ends.extend([run_end] * len(composed))
            run.clear()

    for index, char in enumerate(text):
        if char in _IGNORABLE:
            continue
        if unicodedata.combining(char) == 0:
            flush()
        run.append(char)
        run_end = index + 1
    flush()
    return "".join(out), ends


# Apostrophe variants read as "'"; quotes and dashes read as a space, like every whitespace character:
# "военный корабль США «Томас С. Гейтс»" shows "... США Томас С. Гейтс", "Eugène-Casimir" is "Eugène Casimir".
_PUNCTUATION = str.maketrans({**dict.fromkeys("\u2018\u2019\u201a\u201b\u02bc\u2032\u00b4\u0060", "'"),
                              **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", " "),
                              **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe63\uff0d", " ")})
_ASCII_SPACES = str.maketrans('\t\n\r\x0b\x0c"-', "       ")
_CLUSTERED = regex.compile("[\\p{M}" + "".join(sorted(_IGNORABLE)) + "]")  # characters that join a neighbour
_STRIP_ACCENTS = regex.compile(r"[\p{Script=Latin}\p{Script=Greek}\p{Script=Cyrillic}]")


@functools.lru_cache(maxsize=65536)
def fold_cluster(cluster: str) -> str:
    """One character with its combining marks, folded for matching: NFKC compatibility forms (full-width,
    ligatures), case-folded, combining marks dropped when the base letter is Latin, Greek or Cyrillic (scripts
    where an accent is optional in names; Thai, Devanagari, ... keep their marks, which are vowels there),
    apostrophe variants as ``'``, quotes, dashes and any whitespace as a space."""
    if cluster.isspace():
        return " "
    decomposed = unicodedata.normalize("NFKD", cluster).casefold()
    if _STRIP_ACCENTS.match(decomposed):
        decomposed = "".join(char for char in unicodedata.normalize("NFKD", decomposed) if not unicodedata.combining(char))
    return unicodedata.normalize("NFC", decomposed.translate(_PUNCTUATION)).translate(_ASCII_SPACES)


_SPACE_RUN = regex.compile("  +")


def _one_space(folded: str) -> tuple[str, Sequence[int]]:
    """``folded`` (one character per raw character) with each run of spaces read as one, and the ends."""
    if "  " not in folded:
        return folded, range(1, len(folded) + 1)
    out: list[str] = []
    ends: list[int] = []
    kept = 0
    for run in _SPACE_RUN.finditer(folded):
        start, end = run.span()
        out.append(folded[kept : start + 1])
        ends.extend(range(kept + 1, start + 1))
        ends.append(end)  # the kept space stands for the whole run
        kept = end
    out.append(folded[kept:])
    ends.extend(range(kept + 1, len(folded) + 1))
    return "".join(out), ends


def _folded(text: str) -> tuple[str, Sequence[int]]:
    if text.isascii():  # the common case: one character each
        return _one_space(text.lower().translate(_ASCII_SPACES))
    if not _CLUSTERED.search(text):  # no marks or invisible characters: each character folds alone
        pieces = list(map(fold_cluster, text))
        if all(len(piece) == 1 for piece in pieces):
            return _one_space("".join(pieces))
    out: list[str] = []
    ends: list[int] = []
    start = 0
    for index in range(1, len(text) + 1):
        if index < len(text) and (text[index] in _IGNORABLE or unicodedata.combining(text[index])):
            continue  # the run goes on
        kept = [i for i in range(start, index) if text[i] not in _IGNORABLE]
        start = index
        if not kept:
            continue
        folded, end = fold_cluster("".join(text[i] for i in kept)), kept[-1] + 1
        if folded == " " and out and out[-1] == " ":
            ends[-1] = end  # a run of spaces reads as one
            continue
        out.append(folded)
        ends.extend([end] * len(folded))
    return "".join(out), ends


def is_ignorable(char: str) -> bool:
    """An invisible character matching drops (zero-width space/joiners, soft hyphen, ...)."""
    return char in _IGNORABLE


def skip_ignorable(text: str, index: int) -> int:
    """The first index >= ``index`` of ``text`` that is not an invisible character."""
    while index < len(text) and text[index] in _IGNORABLE:
        index += 1
    return index


_FINAL_STOP = regex.compile(r"(?<=[\p{L}\p{M}\p{N}]{2})\.$")  # after a word, not an initial ("Mira W.")


def clean_subject(subject: str, fold: bool = False) -> str:
    """A subject as the matcher compares it: invisible characters removed, NFC (and folded with ``fold``,
    without a final full stop after a word of 2+ characters: "Орден Княгини Ольги." is found in "орден
    княгини Ольги?"; "Mira W." keeps its stop, else "мира в" would read "мире в")."""
    if not fold:
        return normalize_for_matching(subject)[0]
    return _FINAL_STOP.sub("", normalize_for_matching(subject, True)[0].strip(" "))


#: The longest subject or alias, in characters, however an entry is made (``edit()``, ``add_aliases``, a
#: ``BankEntry``, a bank file). The matcher reads a window of about four times the longest form at every
#: token: one 27,000-character subject made every forward take seconds.
MAX_FORM_LENGTH = 256


def check_form_length(form: str, where: str) -> None:
    """``ValueError`` naming ``where`` when ``form`` is longer than ``MAX_FORM_LENGTH``."""
    if len(form) > MAX_FORM_LENGTH:
        raise ValueError(f"{where} has {len(form)} characters; subjects and aliases may have at most {MAX_FORM_LENGTH}")


def check_aliases(aliases: object, where: str) -> tuple[str, ...]:
    """Aliases as a tuple of distinct NFC strings of at most ``MAX_FORM_LENGTH`` characters (``TypeError``/
    ``ValueError`` naming ``where``)."""
    if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)):
        raise TypeError(f"{where}: aliases must be a list of str, got {type(aliases).__name__}")
    for index, alias in enumerate(aliases):
        if not isinstance(alias, str) or not alias.strip():
            raise ValueError(f"{where}: aliases[{index}] must be a non-empty str, got {alias!r}")
        check_form_length(alias, f"{where}: aliases[{index}]")
    return tuple(dict.fromkeys(nfc(alias) for alias in aliases))
