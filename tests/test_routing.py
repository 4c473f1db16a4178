"""Routing beyond exact match, lexical stages: normalised matching, inflections, reorderings, spellings and
aliases (the representation stage: test_routing_keys)."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
import torch

from lafn_hf import BankEntry, EditableCausalLM, LanguageEdit
from lafn_hf.routing import RoutingConfig, routes
from lafn_hf.routing.matcher import SubjectHit, SubjectMatch, SubjectMatcher
from lafn_hf.routing.row_reader import RowReader, decoder_for, find_subject_tokens

from .conftest import fact_group, make_entry

SUBJECT = "Marbrafi"
PROMPT = f"The capital of {SUBJECT} is"


# -- the lexical stage -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["the eiffel tower is tall", "THE EIFFEL TOWER", "Eiffel\u00a0 Tower", "Eiffel\nTower",
                                  "ｅｉｆｆｅｌ ｔｏｗｅｒ"])
def test_case_width_and_whitespace_variants_route(text: str) -> None:
    assert [m.subject for m in SubjectMatcher(["Eiffel Tower"]).find(text)] == ["Eiffel Tower"]
    assert SubjectMatcher(["Eiffel Tower"], fold=False).find(text) == []


def test_accents_nfd_and_typographic_apostrophes_route() -> None:
    matcher = SubjectMatcher(["Côte d'Ivoire", "São Paulo", "Ёлкино"])
    text = "Where is Cote d\u2019Ivoire? Near Sa\u0303o Paulo? Not in Елкино."
    assert [m.subject for m in matcher.find(text)] == ["Côte d'Ivoire", "São Paulo", "Ёлкино"]
    spans = [text[m.start:m.end] for m in matcher.find(text)]
    assert spans == ["Cote d\u2019Ivoire", "Sa\u0303o Paulo", "Елкино"]  # offsets map back to the raw text
    assert SubjectMatcher(["Côte d'Ivoire"], fold=False).find(text) == []


def test_thai_and_devanagari_marks_are_kept() -> None:
    assert SubjectMatcher(["กิน"]).find("กัน") == []  # Thai vowel marks are letters, not accents
    assert SubjectMatcher(["किताब"]).find("कताब") == []


@pytest.mark.parametrize("text", ["Romeo and Juliet", "ROMEO", "romer", "rome2"])
def test_rome_never_routes_inside_a_longer_word(text: str) -> None:
    assert SubjectMatcher(["Rome"]).find(text) == []


def test_folded_subjects_route_through_the_model(trained_model: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    entry = make_entry({"en": SUBJECT}, layers=(0, 1), size=256, scale=8.0)
    editable.add_entry(entry)
    texts = ["the capital of MARBRAFI is", "the capital of marbrafi is", "the capital of Romeo is"]
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[entry.id], [entry.id], []]
    editable.routing = RoutingConfig(normalize=False)
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[], [], []]


INFLECTED = ["Антон Минарик", "Лукреция Борджиа", "Dena Feingoldová", "Носорог", "Лето", "Francium", "Москва",
             "Генрих V", "Брюс Ли", "Дик Трейси", "Горькие яблоки", "Средняя школа Олд Миддлтауна",
             "Джон Боуз, 10-й граф Стратмор", "Диана Э. Х. Рассел"]


@pytest.mark.parametrize(("text", "found"), [
    ("Дата рождения Антона Минарика?", ("Антон Минарик", "Антона Минарика")),
    ("Кто отец Лукреции Борджиа?", ("Лукреция Борджиа", "Лукреции Борджиа")),
    ("Jaké bylo pohlaví Deny Feingoldové?", ("Dena Feingoldová", "Deny Feingoldové")),
    ("Какова была семья НОСОРОГА?", ("Носорог", "НОСОРОГА")),
    ("Антон Минарик родился", ("Антон Минарик", "Антон Минарик")),  # as written: the exact stage's
    ("сколько лет актрисе", None),  # a one-word subject of 4 letters inflects not at all
    ("ve Francii a Německu", None),  # a one-word subject replaces at most its last letter
    ("в Москвичами", None),  # "Москв" + "ичами": an ending of more than 3 letters
    ("Антона Минарика2", None),  # the word goes on with a digit
    ("Минари родился", None),  # a word cut short
    ("Кто был создателем Дика Трейси?", ("Дик Трейси", "Дика Трейси")),  # 3-letter words may grow
    ("Генриха VIII", None),  # Roman numerals and words under 3 letters never inflect
    ("Брюс Линч", None),
    ("Генриха V", ("Генрих V", "Генриха V")),
    # zero endings: a word of 6+ letters of a multi-word subject may lose its last letter (once it ends)
    ("Кто был режиссером «Горьких яблок»?", ("Горькие яблоки", "Горьких яблок")),
    ("Где находится средняя школа Олд Миддлтаун?", ("Средняя школа Олд Миддлтауна", "средняя школа Олд Миддлтаун")),
    ("Кто написал Горькие ябло?", None),  # 2 letters less: cut short
    ("в Носоро", None),  # a one-word subject: never
    # commas and full stops between words stay as written; an ordinal's ending changes after its number
    ("Мать Джона Боуза, 10-го графа Стратмора?", ("Джон Боуз, 10-й граф Стратмор", "Джона Боуза, 10-го графа Стратмора")),
    ("Мать Джона Боуза 10-го графа Стратмора?", None),
    ("Дата рождения Дианы Э. Х. Рассел?", ("Диана Э. Х. Рассел", "Дианы Э. Х. Рассел")),
])
def test_subjects_of_inflecting_languages_route_with_their_endings_changed(text: str, found: Any) -> None:
    matcher = SubjectMatcher(INFLECTED, inflected=INFLECTED)
    assert [(m.subject, text[m.start:m.end]) for m in matcher.find(text)] == ([found] if found else [])
    if found and found[0] != found[1]:
        assert SubjectMatcher(INFLECTED).find(text) == []  # without the inflection stage: missed


def hits_token_by_token(tokenizer: Any, matcher: SubjectMatcher, text: str) -> tuple[list[int], list[Any]]:
    """(the text's ids, its hits) after checking that reading it token by token fires where the whole text
    does (a subject as written whose word goes on in the next token fires there as written when read token
    by token, and by the inflection stage when read whole: "Минарик|а")."""
    special = frozenset(tokenizer.all_special_ids)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    whole = find_subject_tokens(tokenizer, ids, matcher, special)
    reader, read = RowReader(decoder_for(tokenizer), special), []
    for position, token in enumerate(ids):
        reader.read([token])
        read += reader.hits(matcher, position)
    assert [(h.subject, h.position) for h in read] == [(h.subject, h.position) for h in whole]
    return ids, whole


def test_inflected_mentions_fire_once_by_the_causal_rule(tokenizer: Any) -> None:
    """Token by token equals the whole text; one hit per mention; the exact form fires where it did."""
    matcher, plain = SubjectMatcher(INFLECTED, inflected=INFLECTED), SubjectMatcher(INFLECTED)
    special = frozenset(tokenizer.all_special_ids)
    for text in ["Кто мать Антона Минарика и Лукреции Борджиа?", "Антон Минарик и Антон Минарика",
                 "Москве, Москва"]:
        ids, whole = hits_token_by_token(tokenizer, matcher, text)
        assert len(whole) == 2
        exact = find_subject_tokens(tokenizer, ids, plain, special)
        assert set(exact) <= set(whole)


def test_zero_endings_and_separators_fire_by_the_causal_rule(tokenizer: Any) -> None:
    """A zero ending fires once the word is seen to end, at that token; token by token equals the whole text."""
    matcher = SubjectMatcher(INFLECTED, inflected=INFLECTED)
    # (text, the text read when the mention fires): a zero ending once the word is seen to end; an ending
    # as soon as the mention is no longer the subject as written and its last word reads as the subject's
    for text, fires_at in [("Кто снял «Горьких яблок»?", "Кто снял «Горьких яблок»"), ("Кто снял Горьких яблок", None),
                           ("Мать Джона Боуза, 10-го графа Стратмора?", "Мать Джона Боуза, 10-го графа Стратмор"),
                           ("Где средняя школа Олд Миддлтаун.", "Где средняя школа Олд Миддлтаун.")]:
        ids, whole = hits_token_by_token(tokenizer, matcher, text)
        if fires_at is None:  # the text ends inside the word: it may still go on
            assert whole == []
            continue
        read = [len(tokenizer.decode(ids[: p + 1]).rstrip("\ufffd")) for p in range(len(ids))]
        assert len(whole) == 1 and whole[0].position == next(p for p, n in enumerate(read) if n >= len(fires_at))


REORDERED = ["Инсбрукский собор", "Калифорнийская туманность", "Мост гроба Декстера", "Кассиопея Карлик",
             "Принц Карл Иоганн Лихтенштейна", "Носорог"]


@pytest.mark.parametrize(("text", "found"), [
    ("В честь кого назван собор Инсбрука?", ("Инсбрукский собор", "собор Инсбрука")),  # reordered, derived
    ("Где находится туманность Калифорния?", ("Калифорнийская туманность", "туманность Калифорния")),
    ("Через какую реку пересекает мост Декстера-Гроба?", ("Мост гроба Декстера", "мост Декстера-Гроба")),
    ("Когда открыта карликовая Кассиопея?", ("Кассиопея Карлик", "карликовая Кассиопея")),
    ("Кто мать принца Карла Иоганна Лихтенштейнского?",  # in order, one word derived
     ("Принц Карл Иоганн Лихтенштейна", "принца Карла Иоганна Лихтенштейнского")),
    ("собор и Инсбрук", None),  # no word may stand between them ("и" is "and"; "в" would be "in")
    ("собор в Инсбруке", None),
    ("туманность Калифорнийскими", ("Калифорнийская туманность", "туманность Калифорнийскими")),
    ("Когда открыта карликовостями Кассиопея?", None),  # a derivation adds at most 6 letters ("овостями": 8)
    ("туманность Калифо", None),  # keeps too little of "калифорнийская"
    ("Мост гроба Декстера", ("Мост гроба Декстера", "Мост гроба Декстера")),  # as written: the exact stage
])
def test_multi_word_subjects_of_inflecting_languages_route_reordered_or_derived(text: str, found: Any) -> None:
    matcher = SubjectMatcher(REORDERED, inflected=REORDERED)
    assert [(m.subject, text[m.start:m.end]) for m in matcher.find(text)] == ([found] if found else [])
    if found and found[0] != found[1]:
        assert SubjectMatcher(REORDERED).find(text) == []  # without the inflection stages: missed


def test_reordered_mentions_fire_once_by_the_causal_rule(tokenizer: Any) -> None:
    """Token by token fires where the whole text does (but see below); one hit per mention; the form as
    written fires by the exact stage only; a run in the subject's order with a derived word once, when its
    last word has ended."""
    matcher = SubjectMatcher(REORDERED, inflected=REORDERED)
    for text, count in [("собор Инсбрука и туманность Калифорния?", 2), ("Мост гроба Декстера", 1),
                        ("мост Декстера гроба, мост Декстера гроба", 2), ("мост гроба Декст", 0)]:
        ids, whole = hits_token_by_token(tokenizer, matcher, text)
        assert len(whole) == count, (text, whole)
        assert all(hit.inflected for hit in whole) == (text != "Мост гроба Декстера")
    special = frozenset(tokenizer.all_special_ids)
    for text in ("мать принца Карла Иоганна Лихтенштейнского.", "мать принца Карла Иоганна Лихтенштейнского"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        reader, stepped = RowReader(decoder_for(tokenizer), special), []
        for position, token in enumerate(ids):
            reader.read([token])
            stepped += reader.hits(matcher, position)
        # token by token, one fire: the inflection stage's where "Лихтенштейнс" reads as an ending; read whole,
        # the word's ending is seen to be too long, and the reorder stage fires the derived form once the word
        # has ended, as ``find`` does (the byte-level toy ends no token at the word's end)
        assert len(stepped) == 1 and ids[stepped[0].position] != ids[-1]
        whole = find_subject_tokens(tokenizer, ids, matcher, special)
        assert [h.position for h in whole] == ([len(ids) - 1] if text[-1] == "." else [])
        assert SubjectMatcher(REORDERED, inflected=REORDERED).find(text) == ([] if text[-1] != "." else [
            SubjectMatch("Принц Карл Иоганн Лихтенштейна", 5, len(text) - 1)])
    # where no token ends at "Лихтенштейнс", the inflection stage never fires; the reorder stage does, at "."
    pieces = ["мать", " принца", " Карла", " Иоганна", " Лихтенштейн", "ского", ".", " Кто"]
    fired = []
    for chunks in ([8], [1] * 8, [5, 3]):  # whole, token by token, in two chunks (a reused KV cache)
        reader, read, done = RowReader(lambda ids: "".join(pieces[i] for i in ids), frozenset()), [], 0
        for size in chunks:
            reader.read(list(range(done, done + size)))
            read += reader.hits(matcher, done)
            done += size
        fired.append(read)
    assert fired[0] == fired[1] == fired[2] == [SubjectHit("Принц Карл Иоганн Лихтенштейна", 6, inflected=True)]


SPELLED = ["โจเซฟ แปป", "เบนี่ เฟเรนซี", "ยูมารักมา", "โจเซฟ", "瓜尔蒂耶罗·亚科佩蒂"]


@pytest.mark.parametrize(("text", "found"), [
    # a transliteration variant; it fires at the first letter that completes a mention within budget (causal)
    ("โจเซฟ แพปป์เสียชีวิตด้วยโรคอะไร", ("โจเซฟ แปป", "โจเซฟ แพป")),
    ("ใครคือแม่ของเบนี เฟเรนซี", ("เบนี่ เฟเรนซี", "เบนี เฟเรนซี")),  # only a tone mark differs
    ("เอื้อมารักมา อยู่ในตระกูลใด?", ("ยูมารักมา", "มารักมา")),  # the span reported: the shortest within budget
    ("โจเซฟ แปป เสียชีวิต", ("โจเซฟ แปป", "โจเซฟ แปป")),  # as written: the exact stage, once
    ("โจเซฟ แมนน์ เสียชีวิต", None),  # another name: 3 edits over 8 letters
    ("โจเซฟ แปปมา", ("โจเซฟ แปป", "โจเซฟ แปป")),
    ("瓜尔蒂耶罗·科佩蒂", None),  # Han characters are syllables: never spelled another way
])
def test_subjects_in_letter_by_letter_scripts_route_spelled_another_way(text: str, found: Any) -> None:
    matcher = SubjectMatcher(SPELLED, spellings=True)
    got = [(m.subject, text[m.start:m.end]) for m in matcher.find(text) if m.subject != "โจเซฟ"]
    assert got == ([found] if found else [])
    if found and found[0] != found[1]:
        assert [m for m in SubjectMatcher(SPELLED).find(text) if m.subject != "โจเซฟ"] == []  # stage off: missed


def test_spelled_mentions_fire_once_by_the_causal_rule(tokenizer: Any) -> None:
    """Token by token (bytes of Thai letters split over tokens) equals the whole text, one hit per mention, at
    the token of the mention's last letter; what the exact stage finds stays as it was."""
    matcher, plain = SubjectMatcher(SPELLED, spellings=True), SubjectMatcher(SPELLED)
    special = frozenset(tokenizer.all_special_ids)
    for text in ["โจเซฟ แพปป์เสียชีวิต และโจเซฟ แปป", "เบนี เฟเรนซี เบนี่ เฟเรนซีี", "ยูมารักมา เอื้อมารักมามา"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        whole = find_subject_tokens(tokenizer, ids, matcher, special)
        for step in (1, 2, 3):
            reader, read = RowReader(decoder_for(tokenizer), special), []
            for position in range(0, len(ids), step):
                reader.read(ids[position : position + step])
                read += reader.hits(matcher, position)
            assert read == whole, (text, step)
        spelled = [hit for hit in whole if hit.spelled]
        assert len(spelled) == 1 and len({hit.subject for hit in whole if hit.subject != "โจเซฟ"}) == 1
        assert set(find_subject_tokens(tokenizer, ids, plain, special)) <= set(whole)
        spelled_end = next(m.end for m in matcher.find(text) if m.subject == spelled[0].subject
                           and text[m.start:m.end] != m.subject)
        while unicodedata.combining(text[spelled_end - 1]):
            spelled_end -= 1  # its last letter
        reader.read([])
        assert reader.ends[spelled[0].position - 1] < spelled_end <= reader.ends[spelled[0].position]


@pytest.mark.parametrize(("subjects", "text"), [
    (["กขคงจทำ"], "กขฅงจทำxyz"),  # "ำ" folds into two characters: the hit is at the raw letter's own token
    (["โจเซฟแปป"], "โจเซฟแปป" + " " * 45 + "จเซฟแปป"),  # spaces stretch the text: the look-back still sees it
    (["โจเซฟแปป"], "โจเซฟแปป" + "\u0e48" * 60 + "จเซฟแปป"),  # so do marks, which the comparison leaves out
    (["กขคงจฉ"], "กขคงจฉ\u0e48\u0e49x"),  # exact stage: marks read after the letter do not fire it again
])
def test_hits_read_one_character_at_a_time_equal_the_whole_text(subjects: list[str], text: str) -> None:
    matcher = SubjectMatcher(subjects, spellings=True)
    decode = lambda ids: "".join(map(chr, ids))  # noqa: E731  one token per character
    whole = RowReader(decode, frozenset())
    whole.read([ord(char) for char in text])
    single, read = RowReader(decode, frozenset()), []
    for position, char in enumerate(text):
        single.read([ord(char)])
        read += single.hits(matcher, position)
    assert read == whole.hits(matcher, 0) and read


def test_a_grown_matcher_finds_spelled_subjects_like_a_rebuilt_one() -> None:
    text = "โจเซฟ แพปป์ และเอื้อมารักมา และเบนี เฟเรนซี"
    grown = SubjectMatcher(["Eiffel Tower"], spellings=True)
    assert not grown.spells  # no subject takes part: no spelling work per token
    for subject in SPELLED:  # one tier each, merged once they pile up
        grown = grown.with_subjects([subject])
    rebuilt = SubjectMatcher(["Eiffel Tower", *SPELLED], spellings=True)
    assert grown.find(text) == rebuilt.find(text) and len(rebuilt.find(text)) == 4  # 3 spelled, "โจเซฟ"
    assert grown.spells and len(rebuilt._spelled) == 3  # "โจเซฟ" is too short, Han never spelled another way


def test_the_bank_routes_spelled_subjects_and_the_stage_turns_off(trained_model: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    entry = make_entry({"th": "โจเซฟ แปป"}, layers=(0, 1))
    editable.add_entry(entry)
    texts = ["โจเซฟ แพปป์เสียชีวิตด้วยโรคอะไร", "โจเซฟ แปปเสียชีวิต", "ใครคือโจเซฟ แมนน์"]
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[entry.id], [entry.id], []]
    encoded = tokenizer(texts[:1], return_tensors="pt")
    edited = editable(**encoded).logits
    editable.routing = RoutingConfig(spellings=False)
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[], [entry.id], []]
    with editable.edits_disabled():
        base = editable(**encoded).logits
    assert torch.equal(editable(**encoded).logits, base) and not torch.equal(edited, base)
    editable.routing = RoutingConfig()
    editable.remove_edit(entry.id)
    assert routes(editable, texts) == [[], [], []]


def test_the_bank_inflects_the_subjects_of_inflecting_languages_only(trained_model: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    russian = make_entry({"ru": "Антон Минарик"}, layers=(0, 1))
    english = make_entry({"en": "Anton Minarik"}, layers=(0, 1))
    editable.add_entry(russian)
    editable.add_entry(english)
    texts = ["Кто мать Антона Минарика?", "Who is Antona Minarika?", "Who is Anton Minarik?"]
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[russian.id], [], [english.id]]
    editable.routing = RoutingConfig(inflections=False)
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[], [], [english.id]]
    editable.routing = RoutingConfig(inflecting_languages=("ru", "en"))
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[russian.id], [english.id],
                                                                                 [english.id]]
    with pytest.raises(TypeError, match="inflecting_languages must be a tuple of language codes, got 'ru'"):
        RoutingConfig(inflecting_languages="ru")  # type: ignore[arg-type]
    assert RoutingConfig(inflecting_languages=("RU",)).inflects("ru_RU")


def test_the_bank_reorders_the_subjects_of_inflecting_languages_only(trained_model: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    russian = editable.add_entry(make_entry({"ru": "Инсбрукский собор"}, layers=(0, 1)))
    english = editable.add_entry(make_entry({"en": "Cathedral Innsbruck"}, layers=(0, 1), seed=1))
    texts = ["В честь кого назван собор Инсбрука?", "Who built the Innsbruck Cathedral?"]
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[russian], []]
    editable.remove_edit(russian)  # the incremental update drops it from the reorder stage too
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[], []]
    editable.routing = RoutingConfig(inflecting_languages=("en",))
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[], [english]]


def test_an_entry_found_twice_at_one_token_fires_once(trained_model: Any, tokenizer: Any) -> None:
    """Its alias as written and its subject inflected complete at the same token ("Marbrafa"): one dV there,
    as when the subject does not inflect (its language is English)."""
    editable = EditableCausalLM(trained_model, tokenizer)
    updates = make_entry({"de": "Marbrafi"}, layers=(0, 1)).updates
    text = "Die Hauptstadt Marbrafa ist"
    encoded = tokenizer([text], return_tensors="pt")
    seen = []
    for language in ("de", "en"):
        entry_id = editable.add_entry(BankEntry({language: "Marbrafi"}, updates, aliases=("Marbrafa",)))
        seen.append(([(r.position, r.stage) for r in routes(editable, [text])[0]], editable(**encoded).logits))
        editable.remove_edit(entry_id)
    assert seen[0][0] == seen[1][0] and torch.equal(seen[0][1], seen[1][1])


def test_inflected_forms_fire_only_entries_of_inflecting_languages(trained_model: Any, tokenizer: Any) -> None:
    """A subject string shared by a Czech and an English entry: the inflected form fires the Czech one only,
    and once it is removed, nothing (updated in place as after a rebuild)."""
    editable = EditableCausalLM(trained_model, tokenizer)
    czech = editable.add_entry(make_entry({"cs": "Barack Obama"}, layers=(0, 1)))
    english = editable.add_entry(make_entry({"en": "Barack Obama"}, layers=(0, 1)))
    texts = ["Kdo je manželka Baracka Obamy?", "Who is Barack Obama?"]
    assert [sorted(r.entry_id for r in found) for found in routes(editable, texts)] == [[czech], sorted([czech, english])]
    editable.remove_edit(czech)
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[], [english]]
    editable.set_bank(editable.bank)  # a rebuild agrees
    assert [[r.entry_id for r in found] for found in routes(editable, texts)] == [[], [english]]


# -- aliases ---------------------------------------------------------------------------------------------
def test_aliases_route_and_can_be_added_later(trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    edit = LanguageEdit(PROMPT, SUBJECT, "Notes", aliases=["Marbravia", "République de Marbrafi"])
    assert edit.aliases == ("Marbravia", "République de Marbrafi")
    assert LanguageEdit.from_dict(edit.to_dict()) == edit
    editable = EditableCausalLM(trained_model, tokenizer)
    entry = make_entry({"en": SUBJECT}, layers=(0, 1))
    editable.add_entry(entry)
    assert routes(editable, ["Welcome to Marbravia."]) == [[]]
    editable.add_aliases(entry.id, ["Marbravia"])
    assert [r.entry_id for r in routes(editable, ["Welcome to marbravia."])[0]] == [entry.id]
    editable.routing = RoutingConfig(aliases=False)
    assert routes(editable, ["Welcome to Marbravia."]) == [[]]
    with pytest.raises(ValueError, match="alias 'the' is refused"):
        editable.add_aliases(entry.id, ["the"])
    with pytest.raises(TypeError, match="aliases must be a list"):
        LanguageEdit(PROMPT, SUBJECT, "Notes", aliases="Marbravia")  # type: ignore[arg-type]
    assert editable.bank.get(entry.id).aliases == ("Marbravia",)  # the refused alias changed nothing


def test_edit_stores_the_groups_aliases(trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    group = fact_group(facts, 0, 1)
    group = type(group)({**group.edits, "en": LanguageEdit(group.edits["en"].prompt, group.edits["en"].subject,
                                                           group.edits["en"].target, aliases=["Marbravia"])})
    result = editable.edit(group)
    assert editable.bank.get(result.entry_id).aliases == ("Marbravia",)


def test_an_inflected_form_routes_through_its_alias() -> None:
    """(Through the model on Gemma's tokenizer: test_real_models; the toy reads byte by byte, where a subject
    completed at a token boundary fires before the next character is read.)"""
    text = "Die Geschichte des EIFFELTURMS ist lang."
    assert SubjectMatcher(["Eiffelturm"]).find(text) == []  # whole words: not inside "Eiffelturms"
    found = SubjectMatcher(["Eiffelturm", "Eiffelturms"]).find(text)
    assert [(m.subject, text[m.start:m.end]) for m in found] == [("Eiffelturms", "EIFFELTURMS")]


@pytest.mark.parametrize("text", [
    "Where is the Eif" + "\u200b" * 80 + "fel Tower?", "Where is the Eiffel" + " " * 120 + "Tower?",
    "Where is the Eiffel" + "\u200b \u00ad" * 30 + "Tower?", "Кто мать Антона" + " \u200b" * 60 + "Минарика?"])
def test_a_mention_stretched_by_invisible_characters_or_spaces_fires_token_by_token(tokenizer: Any, text: str) -> None:
    """The look-back counts what matching reads, not raw characters: a mention with a long run of
    zero-width characters or spaces inside fires reading token by token, as in the whole text."""
    matcher = SubjectMatcher(["Eiffel Tower", "Антон Минарик"], inflected=["Антон Минарик"])
    _, whole = hits_token_by_token(tokenizer, matcher, text)
    assert len(whole) == 1
