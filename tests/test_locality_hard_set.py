"""The shipped Locality-Hard set (``lafn_hf/bench/data/locality_hard.json``): its shape, and, where the MzsRE dev
split is on this machine (outside the repository), its agreement with the items it is keyed by."""

from __future__ import annotations

import json
import logging
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from lafn_hf.bench import load_locality_hard
from lafn_hf.bench.runner import item_questions
from lafn_hf.routing.matcher import SubjectMatcher
from lafn_hf.text import nfc
from lafn_hf.zsre import load_items, resolve_item

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev"
LANGUAGES = ("en", "zh", "de", "fr")


def _entries() -> list[dict[str, Any]]:
    text = (resources.files("lafn_hf.bench") / "data" / "locality_hard.json").read_text("utf-8")
    return json.loads(text)["items"]


def _questions() -> list[tuple[int, str, str, str]]:
    """(index, language, subject, question) of every question in the shipped set."""
    return [(entry["index"], lang, side["subject"], question) for entry in _entries()
            for lang, side in entry.items() if isinstance(side, dict) for question in side["questions"]]


def test_the_shipped_set_has_its_size_and_shape() -> None:
    entries, questions = _entries(), _questions()
    assert len(questions) >= 300 and len({entry["index"] for entry in entries}) == len(entries) >= 150
    per_language = Counter(lang for _, lang, _, _ in questions)
    assert set(per_language) == set(LANGUAGES) and all(per_language[lang] >= 150 for lang in ("en", "zh")), per_language
    assert all(isinstance(entry["relation"], str) and entry["relation"].strip() for entry in entries)
    assert all(entry.keys() <= {"index", "relation", *LANGUAGES} for entry in entries)
    texts = [nfc(question) for _, _, _, question in questions]
    assert len(texts) == len(set(texts)), [text for text, n in Counter(texts).items() if n > 1]
    for index, lang, subject, question in questions:
        assert subject.strip() and nfc(subject) in nfc(question), (index, lang, subject, question)
        assert SubjectMatcher([subject]).find(question), (index, lang, subject, question)  # the matcher fires on it
    hard = load_locality_hard()
    assert sum(len(found) for sides in hard.values() for _, found in sides.values()) == len(questions)


@pytest.mark.parametrize("pair", ["zh", "de", "fr"])
def test_the_shipped_set_agrees_with_the_dev_items_and_is_asked_in_each_language(pair: str) -> None:
    path = DEV / f"mzsre_dev_en{pair}.json"
    if not path.is_file():  # the dev split lives outside the repository
        pytest.skip(f"{path} is not on this machine")
    logging.getLogger("lafn_hf.editing.subject_span").setLevel(logging.ERROR)  # one warning per aligned span otherwise
    dev, hard = load_items(path), load_locality_hard()
    for index, sides in hard.items():
        item = dev[index]
        spans = resolve_item(item)[1]
        asked = [q.text for q in item_questions(index, item, hard) if q.kind == "locality_hard"]
        for lang in ("en", pair):
            if lang not in sides:
                continue
            subject, questions = sides[lang]
            record = item[lang]
            # the subject as the item gives it, or as its question writes it (the span its edit is made at)
            assert subject in (record.subject, spans[lang].text if lang in spans else None), (index, lang, subject)
            assert not {nfc(q) for q in questions} & {nfc(record.src), nfc(record.rephrase)}, (index, lang)
            assert set(questions) <= set(asked), (index, lang)  # the bench asks it of this item
