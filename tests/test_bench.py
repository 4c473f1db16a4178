from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.bench import (
    BenchSettings,
    InContextMethod,
    LafnMethod,
    UneditedMethod,
    answer_hit,
    build_methods,
    contains,
    markdown_table,
    normalize_answer,
    reach_table,
    run_bench,
    same_answer,
)
from lafn_hf.bench.metrics import token_f1
from lafn_hf.bench.runner import REFERENCE, item_questions, settings_difference
from lafn_hf.cli import main
from lafn_hf.evaluate import answer_end
from lafn_hf.models import tiny_fact_group
from lafn_hf.zsre import Item, load_files

FIXTURES = Path(__file__).parent / "fixtures"
ENZH, ENDE = FIXTURES / "mzsre_test_duplicate_enzh.json", FIXTURES / "mzsre_test_duplicate_ende.json"
# a tiny Locality-Hard set for the fixtures: same subject, another relation
HARD = {0: {"en": ("Marbrafi", ["The language of Marbrafi is"]), "zh": ("多塞里国", ["多塞里国的语言是"])},
        1: {"en": ("not the item's subject", ["The language of Dorzotho is"])}}
FAST = LafnConfig(layers=(0, 1), steps=30)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One intra-op thread: on a shared 2-core machine two threads made the toy's edits up to 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def model(tokenizer: Any, trained_model: Any) -> EditableCausalLM:
    return EditableCausalLM(trained_model, tokenizer)


def test_metrics_on_hand_computed_cases() -> None:
    assert normalize_answer("  The Sopwith-Company.\n") == "the sopwith company"
    assert normalize_answer("ＲＯＭＥ！") == "rome" and normalize_answer("伦夸城。") == "伦夸城"
    assert answer_hit("Rome, Italy", "rome") and answer_hit(" ROME.", "Rome")
    assert not answer_hit("Romeo and Juliet", "Rome") and not answer_hit("The city of Rome", "Rome")
    assert contains("The city of Rome.", "Rome") and not contains("Romeo", "Rome")
    assert contains("Romeo, then Rome", "Rome")  # the second occurrence is a whole word
    assert answer_hit("伦夸城市", "伦夸城") and contains("首都是伦夸城", "伦夸城")  # no word boundaries in Han
    assert not answer_hit("anything", "...") and not contains("anything", "")
    assert same_answer("Thobra.", " thobra") and not same_answer("Thobra", "Thobrai")
    assert token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(4 / 7)  # P 2/4, R 2/3


def test_answers_end_at_a_line_break_after_some_text(tokenizer: Any) -> None:
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    newline, notes = ids("\n"), ids("Notes")
    assert answer_end(tokenizer, newline + notes + newline + ids("x")) == len(newline + notes)  # a leading break stays
    assert answer_end(tokenizer, notes + [tokenizer.eos_token_id] + notes) == len(notes)
    assert answer_end(tokenizer, notes) == len(notes)


def test_in_context_prompts() -> None:
    assert InContextMethod.fact_text("en", "The capital of Marbrafi is", "Notes") == \
        "New fact: The capital of Marbrafi is Notes.\n"
    assert InContextMethod.fact_text("zh", "多塞里国的首都是", "伦夸城") == "新事实：多塞里国的首都是伦夸城。\n"
    assert InContextMethod.fact_text("de", "Die Hauptstadt von X ist", "Y") == "Neue Tatsache: Die Hauptstadt von X ist Y.\n"


def test_each_method_edits_and_rolls_back_exactly(model: EditableCausalLM) -> None:
    group = tiny_fact_group(0, 1)
    prompts, langs = [e.prompt for e in group.edits.values()], list(group.edits)
    unrelated = tiny_fact_group(5, 6).edits["en"].prompt
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    names = ["lafn", "unedited", "in-context"] + (["lora"] if _has_peft() else [])
    for method in build_methods(names, model, FAST):
        before = method.answer(prompts + [unrelated], langs + ["en"])
        handle = method.apply(group)
        during = method.answer(prompts, langs)
        if method.name in ("lafn", "lora"):
            assert answer_hit(during[0], "Notes"), (method.name, during)
        elif method.name == "unedited":
            assert during == before[:2]
        else:
            assert method.render(prompts[1], "zh").startswith("新事实：多塞里国的首都是伦夸城。\n")
        method.rollback(handle)
        assert method.answer(prompts + [unrelated], langs + ["en"]) == before, method.name
        assert len(model.bank) == 0
    restored = model.model.state_dict()
    assert set(restored) == set(weights) and all(torch.equal(weights[k], restored[k]) for k in weights)
    assert all(p.requires_grad for p in model.model.parameters())


def test_in_context_subject_retrieval_leaves_unrelated_questions(model: EditableCausalLM) -> None:
    method = InContextMethod(model, retrieval="subject")
    handle = method.apply(tiny_fact_group(0, 1))
    assert method.render("The capital of Marbrafi is", "en").startswith("New fact: ")
    assert method.render("The capital of Dorzotho is", "en") == "The capital of Dorzotho is"
    assert method.render("多塞里国的首都是", "de") == "多塞里国的首都是"  # no fact in that language
    method.rollback(handle)
    assert method.render("The capital of Marbrafi is", "en") == "The capital of Marbrafi is"
    with pytest.raises(ValueError, match="retrieval must be one of"):
        InContextMethod(model, retrieval="never")


def test_lora_trains_to_its_target_and_unloads(model: EditableCausalLM) -> None:
    pytest.importorskip("peft")
    from lafn_hf.bench import LoraMethod

    method = LoraMethod(model)
    assert method.layers == (0, 1) and method.settings()["modules"] == ["gate_proj", "up_proj", "down_proj"]
    handle = method.apply(tiny_fact_group(0, 1))
    assert handle.info["reached"] and handle.info["final_nll"] < 0.05
    assert any("lora" in name for name, _ in model.model.named_modules())
    method.rollback(handle)
    assert not any("lora" in name for name, _ in model.model.named_modules())
    assert not hasattr(model.model, "peft_config")


def test_questions_and_subject_not_found_counts() -> None:
    items = load_files([ENZH, ENDE])
    questions = item_questions(0, items[0], HARD)
    kinds = [(q.lang, q.kind) for q in questions]
    assert kinds.count(("en", "locality_hard")) == 1 and kinds.count(("zh", "locality_hard")) == 1
    assert ("de", "locality_hard") not in kinds and len(questions) == 5 + 5 + 4
    assert not any(q.kind == "locality_hard" for q in item_questions(1, items[1], HARD))  # other subject
    de = [q for q in item_questions(2, items[2], HARD) if q.lang == "de"]
    # "Lunvalfiland" is absent, but the English "Lunvalfi", where the German edit is made, is written
    assert [q.subject_found for q in de if q.kind == "reliability"] == [True]
    de = [q for q in item_questions(2, _unnamed_de(items[2]), HARD) if q.lang == "de"]
    assert [q.subject_found for q in de if q.kind == "reliability"] == [False]


def test_a_locality_hard_question_applies_at_the_given_subject_or_the_span_its_language_edits_at() -> None:
    items = load_files([ENZH, ENDE])
    asks = "Die Sprache von Lunvalfi ist"  # item 2's German question writes "Lunvalfi", not "Lunvalfiland"

    def hard_de(subject: str, item: Item = items[2], search: str = "aligned") -> list[str]:
        hard = {2: {"de": (subject, [asks])}}
        return [q.text for q in item_questions(2, item, hard, search) if q.kind == "locality_hard"]

    assert hard_de("Lunvalfi") == [asks] and hard_de("Lunvalfiland") == [asks]  # the span, the given subject
    assert hard_de("Lunvalfi", search="written") == []  # no German edit at "Lunvalfi" without the span search
    assert hard_de("Dorzotho") == [] and hard_de("Lunvalfi", _unnamed_de(items[2])) == []  # no German edit there


def _unnamed_de(item: Item) -> Item:
    """``item`` with German questions that write no form of its subject."""
    record = item["de"]
    return {**item, "de": dataclasses.replace(record, src="Die Hauptstadt von Xoqtrezu ist",
                                             rephrase="Die Hauptstadt des Landes Xoqtrezu ist",
                                             portability_question="In Xoqtrezu ist die Hauptstadt")}


def test_a_locality_hard_answer_naming_the_edits_target_is_counted_as_hijacked() -> None:
    from lafn_hf.bench.runner import score

    items = load_files([ENZH])
    (question,) = [q for q in item_questions(0, items[0], HARD) if q.kind == "locality_hard" and q.lang == "en"]
    target = items[0]["en"].alt
    assert question.target == target
    reference = {"gold": [[]], "ids": [[5, 6]], "answers": ["Some city"]}
    hijacked = score(question, [7], f"{target} again", reference, 0, "generate")
    kept = score(question, [5, 6], "Some city", reference, 0, "generate")
    assert (hijacked["hijacked"], hijacked["hit"]) == (True, False)
    assert (kept["hijacked"], kept["hit"], kept["f1"]) == (False, True, 1.0)
    named_before = {"gold": [[]], "ids": [[5]], "answers": [f"{target}?"]}
    assert score(question, [7], f"{target}.", named_before, 0, "generate")["hijacked"] is False


def test_resume_is_keyed_on_settings(model: EditableCausalLM, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    items = load_files([ENZH])
    path = tmp_path / "results.jsonl"
    methods = [UneditedMethod(model), InContextMethod(model)]
    made: list[tuple[int, str]] = []

    def record(r: dict[str, Any]) -> None:
        made.append((r["index"], r["method"]))

    first = run_bench(model, items, methods, path, BenchSettings(limit=2), locality_hard=HARD, progress=False,
                      on_record=record)
    assert made == [(0, "unedited"), (0, "in-context"), (1, "unedited"), (1, "in-context")]
    lines = path.read_text().splitlines()
    assert "lafn_bench" in json.loads(lines[0])
    assert len(lines) == 1 + 2 + 2 * 3  # header, one settings line per method, reference + 2 rows per item
    made.clear()
    again = run_bench(model, items, methods, path, BenchSettings(limit=2), locality_hard=HARD, progress=False,
                      on_record=record)
    assert made == [] and again == first
    with path.open("a") as handle:
        handle.write('{"index": 2, "meth')  # an interrupted write
    run_bench(model, items, methods, path, BenchSettings(), locality_hard=HARD, progress=False, on_record=record)
    assert made == [(2, "unedited"), (2, "in-context")]
    assert sum(json.loads(line).get("method") == REFERENCE for line in path.read_text().splitlines()[1:]) == 3
    with pytest.raises(ValueError, match=r"mode: 'generate' there, 'teacher_forced' now.*--fresh"):
        run_bench(model, items, methods, path, BenchSettings(mode="teacher_forced"), locality_hard=HARD,
                  progress=False)
    made.clear()  # one method's settings changed: only its rows are made again, the others are reused
    changed = [methods[0], InContextMethod(model, retrieval="subject")]
    with caplog.at_level(logging.WARNING, logger="lafn_hf.bench.runner"):
        run_bench(model, items, changed, path, locality_hard=HARD, progress=False, on_record=record)
    assert made == [(0, "in-context"), (1, "in-context"), (2, "in-context")]
    assert "in-context: 3 rows made under other settings are not reused (retrieval: 'always' there, " \
           "'subject' now)" in caplog.text
    assert settings_difference({"a": [1, 2], "b": {"c": 1}}, {"a": (1, 2), "b": {"c": 2}}) == [
        "b.c: 1 there, 2 now"]  # a tuple equals the list it was stored as
    made.clear()  # back to the first settings: their rows are still in the file and reused
    assert run_bench(model, items, methods, path, BenchSettings(limit=2), locality_hard=HARD, progress=False,
                     on_record=record) == first and made == []
    with pytest.raises(ValueError, match="locality_hard_sha256"):
        run_bench(model, items, methods, path, locality_hard={}, progress=False)
    made.clear()
    run_bench(model, items, methods, path, BenchSettings(limit=1, mode="teacher_forced"), locality_hard=HARD,
              progress=False, fresh=True, on_record=record)
    assert made == [(0, "unedited"), (0, "in-context")] and len(list(tmp_path.glob("results.*.jsonl"))) == 1


def test_report_table_shape_and_scores(model: EditableCausalLM, tmp_path: Path) -> None:
    methods = build_methods(["lafn", "unedited"], model, FAST)
    summary = run_bench(model, load_files([ENZH]), methods, tmp_path / "r.jsonl", BenchSettings(limit=1),
                        locality_hard=HARD, progress=False)
    table = markdown_table(summary).splitlines()
    assert table[2] == ("| method | en Rel | en Gen | en Loc | en Loc-Hard | en Port | zh Rel | zh Gen | zh Loc | "
                        "zh Loc-Hard | zh Port |")
    rows = [line.split("|")[1:-1] for line in table[4:6]]
    assert [r[0].strip() for r in rows] == ["lafn", "unedited"] and all(len(r) == 1 + 10 for r in rows)
    hit = summary["scores"]["hit"]
    assert hit["unedited"]["en"] == {"reliability": 0.0, "generality": 0.0, "locality": 100.0,
                                     "locality_hard": 100.0, "portability": 0.0}
    assert hit["lafn"]["en"]["reliability"] == 100.0 and hit["lafn"]["zh"]["reliability"] == 100.0
    assert hit["lafn"]["en"]["locality"] == 100.0
    assert set(summary["scores"]) == {"hit", "contains", "f1"}
    assert "- lafn: edits made en 1/1, zh 1/1; failed or not made 0, mean steps 30.0" in table
    record = next(json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()
                  if '"method": "lafn"' in line)
    assert summary["edits"]["lafn"]["mean_shared_neurons"] == {k: float(v) for k, v in
                                                               record["info"]["shared_neurons"].items()}
    reach = reach_table(summary).splitlines()
    assert reach[2] == "| method | en Rel | en Gen | zh Rel | zh Gen |"
    assert reach[4].startswith("| lafn | 100.0 / - |") and reach[5].startswith("| unedited | 0.0 / - |")
    assert summary["hit_by_reach"]["not_found"] == {}  # every question of this item names its subject


def test_failed_edits_and_unreachable_subjects_are_counted(model: EditableCausalLM, tmp_path: Path) -> None:
    items = load_files([ENZH, ENDE])  # the toy knows no German: the en+zh+de group does not take
    methods = build_methods(["lafn", "unedited"], model, FAST)
    summary = run_bench(model, items, methods, tmp_path / "r.jsonl", BenchSettings(limit=1), locality_hard=HARD,
                        progress=False)
    hit = summary["scores"]["hit"]
    assert summary["edits"]["lafn"]["errors"] == 1 and hit["lafn"] == hit["unedited"]  # answered unedited
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()[1:]]
    failed = [r for r in rows if r.get("method") == "lafn"]
    assert len(failed) == 1 and failed[0]["error"].startswith("EditFailedError")
    items[2] = _unnamed_de(items[2])
    summary = run_bench(model, items, [UneditedMethod(model)], tmp_path / "u.jsonl", locality_hard=HARD, progress=False)
    table = markdown_table(summary).splitlines()
    assert table[2].startswith("| method | de Rel | de Gen | de Loc | de Port | en Rel |")
    assert "- de: no form of the subject in the question (the edit cannot reach it): Rel 1/3, Gen 1/3, Port 1/3" in table
    missed = summary["hit_by_reach"]["not_found"]["unedited"]
    assert set(missed) == {"de"} and set(missed["de"]) == {"reliability", "generality", "portability"}
    rows = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()[1:]]
    (row,) = [r for r in rows if r.get("method") == "unedited" and r["index"] == 2]
    assert "subject 'Lunvalfiland' does not occur in prompt 'Die Hauptstadt von Xoqtrezu ist'" in row["skipped"]["de"]
    assert summary["edits"]["unedited"]["skipped"] == {"de": 1, "en": 0, "zh": 0}
    (row,) = [r for r in rows if r.get("method") == "unedited" and r["index"] == 0]
    assert row["skipped"] == {} and row["spans"] == {}


def test_lafn_bench_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny-bilingual", "--data", str(ENZH), "--methods", "unedited,in-context",
                 "--limit", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | en Rel | en Gen | en Loc | en Port | zh Rel |" in printed and "| in-context |" in printed
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "summary.json", "tables.md", "plot.png"}
    assert json.loads((out / "summary.json").read_text())["items"] == 1
    assert main(["bench", "--model", "tiny-bilingual", "--data", str(ENZH), "--methods", "lafn,rome",
                 "--out", str(out)]) == 2
    assert "unknown method(s) ['rome']" in capsys.readouterr().err


def _has_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def test_batched_answers_equal_one_by_one(model: EditableCausalLM) -> None:
    group = tiny_fact_group(0, 1)
    others = [tiny_fact_group(i, i + 1).edits[lang].prompt for i in (5, 7) for lang in ("en", "zh")]
    prompts = [e.prompt for e in group.edits.values()] + others  # lengths differ: the batch is left-padded
    langs = list(group.edits) + ["en", "zh"] * 2
    budgets = [3, 6, 1, 4, 5, 2]
    method = LafnMethod(model, FAST)
    handle = method.apply(group)
    try:
        alone = [method.predict(p, lang, "generate", (), b) for p, lang, b in zip(prompts, langs, budgets)]
        together = method.predict_many(prompts, langs, "generate", None, budgets, batch_size=4)
        assert together == alone and [len(a) for a in alone] == [min(b, len(a)) for a, b in zip(alone, budgets)]
        assert answer_hit(method.decode(together[0]), "Notes")  # the edited rows fired inside the batch
        golds = [alone[0], alone[1], [], alone[3], alone[4], alone[5]]
        forced = method.predict_many(prompts, langs, "teacher_forced", golds, budgets, batch_size=6)
        assert forced == [method.predict(p, lang, "teacher_forced", g) for p, lang, g in zip(prompts, langs, golds)]
        assert forced[2] == [] and forced[0] == alone[0]
        config = model.model.generation_config
        eos, second = config.eos_token_id, alone[1][1]
        config.eos_token_id = [model.tokenizer.eos_token_id, second]  # a second EOS, as Gemma-3 and instruct models have
        try:
            stopped = method.predict_many(prompts, langs, "generate", None, budgets, batch_size=4)
            assert stopped[1] == alone[1][:1]  # cut at the second EOS, no pad after it
            assert stopped == [method.predict(p, lang, "generate", (), b) for p, lang, b in zip(prompts, langs, budgets)]
        finally:
            config.eos_token_id = eos
    finally:
        method.rollback(handle)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        method.predict_many(prompts, langs, batch_size=0)
    with pytest.raises(ValueError, match="got 6 prompts, 5 languages"):
        method.predict_many(prompts, langs[:5])


def test_bench_batches_change_no_result(model: EditableCausalLM, tmp_path: Path) -> None:
    items = load_files([ENZH])
    methods = build_methods(["lafn", "unedited", "in-context"], model, FAST)
    one = run_bench(model, items, methods, tmp_path / "1.jsonl", BenchSettings(limit=2, batch_size=1),
                    locality_hard=HARD, progress=False)
    many = run_bench(model, items, methods, tmp_path / "16.jsonl", BenchSettings(limit=2), locality_hard=HARD,
                     progress=False)
    assert many["scores"] == one["scores"] and one["scores"]["hit"]["lafn"]["en"]["reliability"] == 100.0
    rows = [json.loads(line) for line in (tmp_path / "16.jsonl").read_text().splitlines()[1:]]
    reference = [r for r in rows if r.get("method") == REFERENCE]
    unedited = [r for r in rows if r.get("method") == "unedited"]
    assert [[s["answer"] for s in r["scores"]] for r in unedited] == [r["answers"] for r in reference]
    with pytest.raises(ValueError, match="wrap the benchmarked model"):
        other = EditableCausalLM.__new__(EditableCausalLM)
        run_bench(model, items, [InContextMethod(other)], tmp_path / "x.jsonl", locality_hard=HARD, progress=False)
