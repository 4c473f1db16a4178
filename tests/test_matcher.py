from __future__ import annotations

import unicodedata
from typing import Any

from lafn_hf.matcher import SubjectMatcher, find_subject_tokens


def spans(matcher: SubjectMatcher, text: str) -> list[tuple[str, int, int]]:
    return [(m.subject, m.start, m.end) for m in matcher.find(text)]


def test_overlapping_subjects_take_leftmost_longest() -> None:
    matcher = SubjectMatcher(["Paris", "Paris Hilton", "Hilton"])
    assert spans(matcher, "Paris Hilton met Paris.") == [("Paris Hilton", 0, 12), ("Paris", 17, 22)]


def test_chinese_and_thai_subjects_at_text_start_and_end() -> None:
    matcher = SubjectMatcher(["埃菲尔铁塔", "กรุงเทพ"])
    assert spans(matcher, "埃菲尔铁塔位于") == [("埃菲尔铁塔", 0, 5)]
    assert spans(matcher, "เมืองหลวงคือกรุงเทพ") == [("กรุงเทพ", 12, 19)]
    assert spans(matcher, "位于巴黎") == []


def test_nfc_and_nfd_inputs_match_the_same_subject() -> None:
    subject = "Besançon"
    matcher = SubjectMatcher([unicodedata.normalize("NFD", subject)])
    for form in ("NFC", "NFD"):
        text = unicodedata.normalize(form, f"{subject} est une ville")
        assert [m.subject for m in matcher.find(text)] == [subject]


def test_last_token_through_offsets_with_bos(tokenizer: Any, facts: dict[str, Any]) -> None:
    subject = facts["facts"][0]["en"]["subject"]
    ids = tokenizer(f"The capital of {subject} is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    hits = find_subject_tokens(tokenizer, ids, SubjectMatcher([subject]))
    assert len(hits) == 1
    assert tokenizer.decode(ids[1 : hits[0].position + 1]).endswith(subject)
    assert not tokenizer.decode(ids[1 : hits[0].position]).endswith(subject)


def test_byte_level_chinese_subject_maps_to_its_last_token(tokenizer: Any, facts: dict[str, Any]) -> None:
    subject = facts["facts"][3]["zh"]["subject"]
    ids = tokenizer(f"{subject}的首都是")["input_ids"]
    (hit,) = find_subject_tokens(tokenizer, ids, SubjectMatcher([subject]))
    # the last subject token is the first token whose text completes the subject (it may run past it)
    assert subject in tokenizer.decode(ids[: hit.position + 1], skip_special_tokens=True)
    assert subject not in tokenizer.decode(ids[: hit.position], skip_special_tokens=True)


def test_prefix_decoding_fallback_agrees_with_offsets(tokenizer: Any, facts: dict[str, Any]) -> None:
    subject = facts["facts"][1]["en"]["subject"]
    ids = tokenizer(f"{subject}'s capital is")["input_ids"]
    matcher = SubjectMatcher([subject])
    expected = find_subject_tokens(tokenizer, ids, matcher)

    class NoOffsets:  # a tokenizer whose re-encoding never reproduces the ids
        all_special_ids = tokenizer.all_special_ids
        decode = staticmethod(tokenizer.decode)

        def __call__(self, text: str, **kwargs: Any) -> dict[str, Any]:
            return {"input_ids": [], "offset_mapping": []}

    assert find_subject_tokens(NoOffsets(), ids, matcher) == expected
    assert expected[0].position == 1 + len(tokenizer(subject, add_special_tokens=False)["input_ids"]) - 1


def test_rows_without_subject_and_padding_give_no_hits(tokenizer: Any) -> None:
    matcher = SubjectMatcher(["Nowhere"])
    assert find_subject_tokens(tokenizer, tokenizer("The capital of")["input_ids"], matcher) == []
    assert find_subject_tokens(tokenizer, [tokenizer.pad_token_id] * 4, matcher) == []
