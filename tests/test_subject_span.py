"""Each language's edit is made at the span its prompt writes the subject as (``lafn_hf.editing.subject_span``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from lafn_hf import EditableCausalLM, EditGroup, LafnConfig, LanguageEdit
from lafn_hf.editing.subject_span import SubjectNotFoundError, find_span, resolve_group
from lafn_hf.routing.trace import routes
from lafn_hf.zsre import MZSRE_LANGUAGES, ZsreRecord, pair_file_code, resolve_item

from .conftest import greedy

TINY = LafnConfig(layers=(0, 1), steps=60)


def _group(**edits: tuple[str, str]) -> EditGroup:
    return EditGroup({lang: LanguageEdit(prompt, subject, "x") for lang, (prompt, subject) in edits.items()})


def test_a_subject_written_as_given_is_found_as_before() -> None:
    span = find_span(_group(en=("Who designed the Eiffel Tower?", "Eiffel Tower")), "en")
    assert (span.text, span.how, span.start) == ("Eiffel Tower", "written", 17)


def test_another_languages_subject_written_in_the_prompt_is_the_span() -> None:
    group = _group(en=("Which artist created Call the Doctor?", "Call the Doctor"),
                   fr=("Quel artiste a créé Call the Doctor ?", "Appelle le docteur"))
    span = find_span(group, "fr")
    assert (span.text, span.how, span.source) == ("Call the Doctor", "other", "Call the Doctor (en)")
    resolved, spans = resolve_group(group)
    assert resolved.edits["fr"].subject == "Call the Doctor"
    assert resolved.edits["fr"].aliases == ("Appelle le docteur",)  # the given form still routes
    assert resolved.edits["en"] is group.edits["en"] and spans["en"].how == "written"


def test_a_declined_subject_is_found_by_the_lexical_stage() -> None:
    span = find_span(_group(ru=("Кто отец Лукреции Борджиа?", "Лукреция Борджиа")), "ru")
    assert (span.text, span.how) == ("Лукреции Борджиа", "lexical")


def test_a_spacing_variant_and_a_transliterated_variant_are_aligned() -> None:
    spaced = find_span(_group(en=("Who made the Volvo B12M bus?", "VolvoB12M")), "en")
    assert (spaced.text, spaced.how, spaced.score) == ("Volvo B12M", "aligned", 100.0)
    latin = find_span(_group(hy=("Where was Shmavon Shmavonyan born?", "Шмавон Шмавонян")), "hy")
    assert (latin.text, latin.how) == ("Shmavon Shmavonyan", "aligned")
    assert latin.score >= 90
    thai = find_span(_group(en=("Who created Zany Golf?", "Zany Golf"), th=("ใครสร้าง Zany Golf?", "ซันนี่ กอล์ฟ")), "th")
    assert (thai.text, thai.how) == ("Zany Golf", "other")


def test_an_aligned_span_leaves_the_words_around_the_subject_out() -> None:
    span = find_span(_group(tr=("Bir Yıldız Yırtık hangi dizideydi?", "Bir Yıldız Parçalanmış")), "tr", threshold=50)
    assert span.text == "Bir Yıldız Yırtık"  # not "... hangi" ("which"), which shares letters with the name


def test_no_plausible_span_is_a_value_error_naming_the_closest_candidate() -> None:
    group = _group(en=("The capital of France is", "Marbrafi"))
    with pytest.raises(SubjectNotFoundError, match="subject 'Marbrafi' does not occur in prompt 'The capital of "
                       "France is'.*the closest span is 'France is' .*38 of 100, below the threshold 65") as caught:
        resolve_group(group)
    assert caught.value.closest is not None and caught.value.closest.text == "France is"
    assert isinstance(caught.value, ValueError)


def test_subject_search_stops_after_its_stage(caplog: pytest.LogCaptureFixture) -> None:
    group = _group(en=("Who made the Volvo B12M bus?", "VolvoB12M"))
    with pytest.raises(ValueError, match="subject 'VolvoB12M' does not occur in prompt .*the closest span is "
                       "'Volvo B12M'"):
        resolve_group(group, "lexical")
    with pytest.raises(ValueError, match="subject_search must be one of"):
        LafnConfig(subject_search="fuzzy")
    with pytest.raises(ValueError, match="alignment_threshold must be a number in \\(0, 100\\], got 0"):
        LafnConfig(alignment_threshold=0)
    with caplog.at_level(logging.WARNING, logger="lafn_hf.editing.subject_span"):
        resolve_group(group)
    assert "subject 'VolvoB12M' is edited at SubjectSpan(en: 'Volvo B12M'" in caplog.text


def test_a_language_whose_prompt_writes_another_languages_subject_is_edited_at_its_last_token(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any], tmp_path: Path) -> None:
    """The toy's Chinese prompt writes only the English name: today's code dropped such a language (or raised)."""
    row, target = facts["facts"][0], facts["facts"][1]
    templates = facts["templates"]
    zh_prompt = templates["zh"][0].format(s=row["en"]["subject"])  # "Marbrafi的首都是"
    group = EditGroup({
        "en": LanguageEdit(templates["en"][0].format(s=row["en"]["subject"]), row["en"]["subject"],
                           target["en"]["object"]),
        "zh": LanguageEdit(zh_prompt, row["zh"]["subject"], target["zh"]["object"]),
    })
    editable = EditableCausalLM(trained_model, tokenizer)
    result = editable.edit(group, TINY)
    span = result.spans["zh"]
    assert (span.text, span.how, span.given) == (row["en"]["subject"], "other", row["zh"]["subject"])
    assert result.target_probabilities["zh"] > 0.5
    assert greedy(editable, tokenizer, zh_prompt).strip().startswith(target["zh"]["object"])
    # dV is added at the last token of the English name in the Chinese prompt
    ids = tokenizer(zh_prompt)["input_ids"]
    name_end = len(tokenizer(zh_prompt[: span.end])["input_ids"]) - 1
    fired = {r.position for r in routes(editable, [zh_prompt])[0]}
    assert fired == {name_end} and name_end < len(ids) - 1
    entry = editable.bank.get(result.entry_id)
    assert entry.subjects["zh"] == row["en"]["subject"] and row["zh"]["subject"] in entry.aliases
    assert entry.metadata["subject_spans"]["zh"]["how"] == "other"
    editable.save_pretrained(tmp_path / "bank")
    reloaded = EditableCausalLM(editable.unwrap(), tokenizer)
    reloaded.load_bank(tmp_path / "bank")
    entry = reloaded.bank.get(result.entry_id)
    assert row["zh"]["subject"] in entry.aliases  # the given form is saved and loaded as an alias
    given = templates["zh"][3].format(s=row["zh"]["subject"])  # a question that writes the given form
    assert routes(reloaded, [given])[0], given


def test_an_item_counts_each_skipped_language_with_its_reason() -> None:
    def record(subject: str, src: str) -> ZsreRecord:
        return ZsreRecord(subject, src, src, "Rome", "Who?", "me")

    item = {"en": record("Call the Doctor", "Which artist created Call the Doctor?"),
            "fr": record("Appelle le docteur", "Quel artiste a créé Call the Doctor ?"),
            "de": record("Ruf den Arzt", "Wer sang das Lied?"),
            "es": record("el", "¿Quién cantó el tema?")}
    group, spans, skipped = resolve_item(item)
    assert group is not None and sorted(group.edits) == ["en", "fr"] and spans["fr"].how == "other"
    assert sorted(skipped) == ["de", "es"]
    assert "subject 'Ruf den Arzt' does not occur in prompt 'Wer sang das Lied?'" in skipped["de"]
    assert "the closest span is" in skipped["de"]
    assert "subject 'el' is refused" in skipped["es"]
    written, _, skipped = resolve_item(item, "written")
    assert written is not None and sorted(written.edits) == ["en"] and "fr" in skipped


def test_mzsre_file_codes_map_to_iso_languages() -> None:
    assert [pair_file_code(lang) for lang in ("cs", "nl", "fr")] == ["cz", "du", "fr"]
    assert len(MZSRE_LANGUAGES) == 12 and MZSRE_LANGUAGES[0] == "en"
