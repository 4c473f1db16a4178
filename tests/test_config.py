from __future__ import annotations

import json
import re

import pytest

from lafn_hf import EditGroup, LafnConfig, LanguageEdit
from lafn_hf.editing.subject_span import resolve_group
from lafn_hf.stopwords import STOP_WORDS


def group(lang: str, prompt: str, subject: str, **extra: object) -> EditGroup:
    return EditGroup.from_dict({lang: {"prompt": prompt, "subject": subject, "target": "Rome", **extra}})


def test_a_subject_of_quotes_and_dashes_only_is_refused() -> None:
    with pytest.raises(ValueError, match="subject '«--»' has nothing to match"):
        LanguageEdit("What «--» is in", "«--»", "Rome", allow_common_subject=True)


@pytest.mark.parametrize(("lang", "prompt", "subject", "reason"), [
    ("en", "Where is the tower? In", "the", "one of the most frequent function words of 'en'"),
    ("en", "THE Tower is in", "THE", "one of the most frequent function words of 'en'"),
    ("de", "Der Turm steht in", "Der", "one of the most frequent function words of 'de'"),
    ("zh", "铁塔的位置在", "的", "one of the most frequent function words of 'zh'"),
    ("ru", "Башня и город", "и", "fewer than 2 letters or digits"),
    ("en", "Plan X is in", "X", "fewer than 2 letters or digits"),
    ("en", "Plan 9 is in", "9", "fewer than 2 letters or digits"),
    ("en", "What ?! is in", "?!", "no letter or digit"),
    ("en", "Plan X\u200b is in", "X\u200b", "fewer than 2 letters or digits"),
])
def test_a_subject_too_short_or_too_common_is_refused_with_the_reason(lang: str, prompt: str, subject: str,
                                                                      reason: str) -> None:
    expected = re.escape(f"edits[{lang!r}]: subject {subject!r} is refused: it ") + f".*{reason}.*allow_common_subject=True"
    with pytest.raises(ValueError, match=expected):
        group(lang, prompt, subject)
    allowed = group(lang, prompt, subject, allow_common_subject=True)  # the explicit opt-in
    assert allowed.edits[lang].allow_common_subject
    assert EditGroup.from_dict(allowed.to_dict()) == allowed


@pytest.mark.parametrize(("lang", "prompt", "subject"), [
    ("zh", "罗马位于", "罗"),  # one CJK character is a word
    ("th", "ไทย อยู่ที่", "ไทย"),
    ("en", "The Theory of Everything is", "Theory"),  # contains "the" but is not it
    ("en", "Como is in", "Como"),  # a Spanish/Portuguese function word, not an English one
    ("de", "Die Hard ist ein Film", "Die Hard"),  # a stop word is only refused as the whole subject
    ("en", "R2 is a droid", "R2"),
])
def test_real_subjects_are_accepted(lang: str, prompt: str, subject: str) -> None:
    assert group(lang, prompt, subject).edits[lang].subject == subject


def test_stop_word_lists_cover_the_mzsre_languages() -> None:
    assert set(STOP_WORDS) == {"en", "de", "fr", "es", "nl", "pt", "cs", "ru", "tr", "vi", "th", "zh"}
    assert all(20 <= len(words) <= 50 for words in STOP_WORDS.values())
    assert all(word == word.casefold() for words in STOP_WORDS.values() for word in words)


def test_from_dict_refuses_a_string_for_paraphrases() -> None:
    with pytest.raises(TypeError, match="paraphrases must be a list of str, got str"):
        LanguageEdit.from_dict({"prompt": "Rome is in", "subject": "Rome", "target": "Italy",
                                "paraphrases": "Rome lies in"})


def test_group_files_refuse_a_language_given_twice_in_a_list() -> None:
    one = '{"prompt": "Rome is in", "subject": "Rome", "target": "Italy"}'
    assert [g.languages for g in EditGroup.list_from_json(f'[{{"en": {one}}}, {{"de": {one}}}]')] == [("en",), ("de",)]
    assert EditGroup.list_from_json(f'{{"en": {one}}}')[0].languages == ("en",)
    with pytest.raises(ValueError, match="group 1: key 'en' is given twice"):
        EditGroup.list_from_json(f'[{{"en": {one}}}, {{"en": {one}, "en": {one}}}]')
    with pytest.raises(ValueError, match="expected a JSON object .* or a list of them, got str"):
        EditGroup.list_from_json('"en"')


def test_unknown_language_warns_once_and_kl_templates_cover_it(caplog: pytest.LogCaptureFixture) -> None:
    config = LafnConfig()
    assert config.kl_prompt("xx", "Rome") == "Rome is a"
    assert config.kl_prompt("xx", "Roma") == "Roma is a"
    warnings = [r.getMessage() for r in caplog.records if "'xx'" in r.getMessage()]
    assert len(warnings) == 1 and "kl_templates" in warnings[0] and "{subject}" in warnings[0]
    caplog.clear()
    covered = LafnConfig(kl_templates={"yy": "{subject} ni"})
    assert covered.kl_prompt("yy", "Roma") == "Roma ni" and not caplog.records
    assert config.kl_prompt("de", "Rom") == "Rom ist ein" and not caplog.records


def test_min_target_probability_is_checked_and_serialised() -> None:
    assert 0 < LafnConfig().min_target_probability < 0.1
    config = LafnConfig(min_target_probability=0.0)
    assert LafnConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["min_target_probability"] == 0.0
    with pytest.raises(ValueError, match="min_target_probability must be in \\[0, 1\\), got 1.5"):
        LafnConfig(min_target_probability=1.5)


def test_the_subject_is_found_in_the_prompt_as_inference_matches_it() -> None:
    romeo = EditGroup({"en": LanguageEdit("The Romeo and Juliet balcony is in", "Rome", "Verona")})
    with pytest.raises(ValueError, match="does not occur in prompt 'The Romeo and Juliet balcony is in'"):
        resolve_group(romeo, "written")  # whole words only; the default aligns it (test_subject_span.py)
    edit = LanguageEdit("Where is Rome? In", "Rome", "Italy", paraphrases=("Rome's country is", "Romeo lives in"))
    assert edit.subject == "Rome"
    LanguageEdit("埃菲尔铁塔位于", "埃菲尔铁塔", "罗马")  # no word boundaries in spaceless scripts
    LanguageEdit("Der Eif\u00adfelturm steht in", "Eiffelturm", "Rom")  # a soft hyphen does not hide it
