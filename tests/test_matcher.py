from __future__ import annotations

import unicodedata
from typing import Any

from lafn_hf.routing.matcher import SubjectMatcher
from lafn_hf.routing.row_reader import RowReader, decoder_for, find_subject_tokens


def spans(matcher: SubjectMatcher, text: str) -> list[tuple[str, int, int]]:
    return [(m.subject, m.start, m.end) for m in matcher.find(text)]


def test_every_occurrence_counts_overlaps_included() -> None:
    matcher = SubjectMatcher(["Paris", "Paris Hilton", "Hilton"])
    assert spans(matcher, "Paris Hilton met Paris.") == [
        ("Paris", 0, 5), ("Paris Hilton", 0, 12), ("Hilton", 6, 12), ("Paris", 17, 22)]


def test_spaced_scripts_match_whole_words_only() -> None:
    matcher = SubjectMatcher(["Rome", "Eiffel Tower", "Москва"])
    assert spans(matcher, "The Romeo and Juliet balcony, Romer, 2Rome, Rome_x") == []
    assert spans(matcher, "Rome. (Rome) «Rome» Rome's Rome-based") == [
        ("Rome", 0, 4), ("Rome", 7, 11), ("Rome", 14, 18), ("Rome", 20, 24), ("Rome", 27, 31)]
    assert spans(matcher, "the Eiffel Towers") == [] and spans(matcher, "Москвы Москва") == [("Москва", 7, 13)]
    assert spans(matcher, "去Rome的路") == [("Rome", 1, 5)]  # a spaced-script subject inside CJK text


def test_invisible_characters_do_not_hide_a_subject() -> None:
    matcher = SubjectMatcher(["Eiffel Tower", "埃菲尔铁塔"])
    for text in ("the Eif\u00adfel Tower is", "the Eiffel\u200b Tower is", "the \ufeffEiffel To\u200dwer is"):
        (match,) = matcher.find(text)
        assert text[match.start : match.end].replace("\u00ad", "").replace("\u200b", "").replace("\u200d", "") \
            == "Eiffel Tower"
    assert [m.subject for m in matcher.find("埃菲\u200b尔铁塔位于")] == ["埃菲尔铁塔"]


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
        assert [m.subject for m in matcher.find(text)] == [unicodedata.normalize("NFD", subject)]


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


def test_the_rule_is_causal_prefixes_never_change_earlier_hits(tokenizer: Any, facts: dict[str, Any]) -> None:
    subjects = [facts["facts"][i][lang]["subject"] for i in range(4) for lang in ("en", "zh")]
    matcher = SubjectMatcher(subjects)
    text = f"{subjects[0]} and {subjects[1]}的首都, then {subjects[2]}{subjects[3]} and {subjects[4]}."
    ids = tokenizer(text)["input_ids"]
    full = find_subject_tokens(tokenizer, ids, matcher)
    assert len(full) >= 4
    for cut in range(1, len(ids) + 1):
        assert find_subject_tokens(tokenizer, ids[:cut], matcher) == [h for h in full if h.position < cut]


def test_a_subject_at_a_token_boundary_fires_only_when_the_word_has_not_gone_on(tokenizer: Any,
                                                                                facts: dict[str, Any]) -> None:
    """Read in one forward (a prompt), the character after the subject is known: "{subject}xy" is one word
    and does not fire. Read token by token (generation), the subject's token fires before "xy" arrives, and
    that decision stands."""
    subject = facts["facts"][1]["en"]["subject"]
    matcher = SubjectMatcher([subject])
    ids = tokenizer(f"The capital of {subject}")["input_ids"]
    letters = tokenizer("xy", add_special_tokens=False)["input_ids"]
    (hit,) = find_subject_tokens(tokenizer, ids, matcher)
    assert find_subject_tokens(tokenizer, ids + letters, matcher) == []
    assert find_subject_tokens(tokenizer, ids + tokenizer(" xy", add_special_tokens=False)["input_ids"], matcher) == [hit]
    assert SubjectMatcher([subject]).find(tokenizer.decode(ids + letters, skip_special_tokens=True)) == []
    reader = RowReader(decoder_for(tokenizer), frozenset(tokenizer.all_special_ids))
    stepped = []
    for position, token in enumerate(ids + letters):
        reader.read([token])
        stepped += reader.hits(matcher, position)
    assert stepped == [hit]


def test_an_inflected_subject_does_not_fire_inside_a_longer_word_of_a_prompt(tokenizer: Any) -> None:
    matcher = SubjectMatcher(["Антон Минарик"], inflected=["Антон Минарик"])
    special = frozenset(tokenizer.all_special_ids)
    for text, fires in [("Антон Минарик2 и", False), ("Антон Минарикович", False),
                        ("Антон Минарика и", True), ("Антон Минарик и", True)]:
        found = find_subject_tokens(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"], matcher, special)
        assert bool(found) == fires == bool(matcher.find(text)), text


def test_forwards_after_the_first_judge_token_by_token(tokenizer: Any) -> None:
    """Assisted decoding reads the last accepted token with draft tokens in one forward, then crops the
    rejected drafts: a subject completed by the accepted token must fire as it would decoding one token at
    a time, whatever draft followed it."""
    matcher = SubjectMatcher(["Rome"])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    reader = RowReader(decoder_for(tokenizer), frozenset(tokenizer.all_special_ids))
    reader.read(encode("In Rom"))
    hits = reader.hits(matcher, 0)
    accepted = len(reader)
    reader.read(encode("e") + encode("o"))  # "e" accepted, the draft "o" rejected below
    hits += reader.hits(matcher, accepted)
    reader = reader.prefix(accepted + 1)
    reader.read(encode(" is"))
    hits += reader.hits(matcher, accepted + 1)
    assert reader.text == "In Rome is" and [h.position for h in hits] == [accepted]


def test_rows_without_subject_and_padding_give_no_hits(tokenizer: Any) -> None:
    matcher = SubjectMatcher(["Nowhere"])
    assert find_subject_tokens(tokenizer, tokenizer("The capital of")["input_ids"], matcher) == []
    assert find_subject_tokens(tokenizer, [tokenizer.pad_token_id] * 4, matcher) == []


def test_quotes_and_hyphens_read_as_spaces_and_a_final_full_stop_is_optional() -> None:
    matcher = SubjectMatcher(["Военный корабль США Томас С. Гейтс", "Eugène-Casimir Villatte", "Орден Княгини Ольги.",
                              "Mira W."])
    found = lambda text: [(m.subject, text[m.start:m.end]) for m in matcher.find(text)]  # noqa: E731
    assert found("Тип судна: военный корабль США «Томас С. Гейтс»?") == [
        ("Военный корабль США Томас С. Гейтс", "военный корабль США «Томас С. Гейтс")]
    assert found("In which war did Eugène Casimir Villatte fight?") == [
        ("Eugène-Casimir Villatte", "Eugène Casimir Villatte")]
    assert found("Eugène–Casimir Villatte") == [("Eugène-Casimir Villatte", "Eugène–Casimir Villatte")]
    assert found("В честь кого назван орден княгини Ольги?") == [("Орден Княгини Ольги.", "орден княгини Ольги")]
    assert found("Дата рождения Mira W.?") == [("Mira W.", "Mira W.")]  # an initial keeps its stop
    assert found("Mira W") == found("Mira Wilkins") == found("Eugène Casimirov Villatte") == []


def test_folding_reads_quote_dash_and_space_runs_as_one_space_with_exact_offsets() -> None:
    from lafn_hf.text import normalize_for_matching
    for text in ('a "b" - c', "a «b» — c", "A \u201cb\u201d \u2013 c"):
        folded, ends = normalize_for_matching(text, fold=True)
        assert folded == "a b c", text
        assert list(ends)[:2] == [1, 3] and list(ends)[-1] == len(text)
