from __future__ import annotations

import inspect
import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.cli import main
from lafn_hf.editing.analysis import (
    count_factual_neurons,
    neuron_set_difference,
    plot_difference_heatmap,
    plot_neuron_counts,
)
from lafn_hf.evaluate import (
    EvalSettings,
    answer_ids,
    evaluate,
    evaluate_item,
    predict_batch,
    remake_score,
    token_f1,
)
from lafn_hf.routing.cache_rows import cache_keyword
from lafn_hf.zsre import ZsreRecord, load_files, load_items, matchability, merge_items

FIXTURES = Path(__file__).parent / "fixtures"
ENZH, ENDE, ENCZ = (FIXTURES / f"mzsre_test_duplicate_en{x}.json" for x in ("zh", "de", "cz"))


def test_token_f1_on_hand_computed_examples(tokenizer: Any) -> None:
    assert token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert remake_score([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(0.5 * 2 / 3)
    assert token_f1([], [5]) == 0.0 and token_f1([], []) == 1.0 and token_f1([7], [8]) == 0.0
    gold = tokenizer("伦夸城", add_special_tokens=False)["input_ids"]
    assert token_f1(list(reversed(gold)), gold) == 1.0
    assert token_f1(tokenizer("伦多城", add_special_tokens=False)["input_ids"], gold) < 1.0


def test_teacher_forcing_passes_the_cache_by_its_current_name(tokenizer: Any, trained_model: Any,
                                                              facts: dict[str, Any]) -> None:
    """The gold tokens are read through the KV cache under the keyword the model's forward names (``cache=`` in
    transformers 5.2x on, where ``past_key_values=`` is deprecated and warns; ``past_key_values=`` on 5.0), and
    the argmaxes equal those of one forward over prompt and gold without a cache."""
    keyword = cache_keyword(trained_model)
    with_cache = "cache" in inspect.signature(trained_model.forward).parameters
    assert keyword == ("cache" if with_cache else "past_key_values")
    rows = facts["facts"]
    prompts = [facts["templates"]["en"][0].format(s=rows[0]["en"]["subject"]),
               facts["templates"]["zh"][1].format(s=rows[3]["zh"]["subject"])]  # two lengths: left padding
    golds = [answer_ids(tokenizer, prompts[0], rows[5]["en"]["object"] + " and " + rows[0]["en"]["object"]),
             answer_ids(tokenizer, prompts[1], rows[3]["zh"]["object"])]
    model = EditableCausalLM(trained_model, tokenizer)
    passed: list[set[str]] = []
    handle = trained_model.register_forward_pre_hook(
        lambda module, args, kwargs: passed.append({k for k, v in kwargs.items() if v is not None}), with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
            forced = predict_batch(model, prompts, "teacher_forced", golds, [len(g) for g in golds])
    finally:
        handle.remove()
    assert len(passed) == max(len(g) for g in golds)  # the prompts' forward, then one per gold token but the last
    assert all(keyword in kwargs for kwargs in passed[1:]) and not any(
        with_cache and "past_key_values" in kwargs for kwargs in passed)
    for prompt, gold, answer in zip(prompts, golds, forced):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            logits = trained_model(input_ids=torch.tensor([ids + gold[:-1]]), use_cache=False).logits[0]
        assert answer == logits[len(ids) - 1:].argmax(-1).tolist()


def test_loader_aliases_merge_and_matchability() -> None:
    assert set(load_items(ENCZ)[0]) == {"en", "cs"}
    items = merge_items([load_items(ENZH), load_items(ENDE)])
    assert len(items) == 3 and all(set(item) == {"en", "zh", "de"} for item in items)
    assert items[0]["en"].loc.startswith("nq question: ")
    assert matchability(items) == {"en": (3, 3), "zh": (3, 3), "de": (2, 3)}
    assert [set(i) for i in load_files([ENZH, ENDE], ["de", "en"])] == [{"de", "en"}] * 3
    with pytest.raises(ValueError, match=r"language\(s\) \['th'\] are in none of the files"):
        load_files([ENZH], ["th"])
    with pytest.raises(ValueError, match="cannot merge files of different lengths"):
        merge_items([load_items(ENZH), load_items(ENCZ)])


def test_lafn_eval_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    code = main(["eval", "--model", "tiny-bilingual", "--data", str(ENZH), str(ENDE), "--out", str(out),
                 "--layers", "0,1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| metric | de | en | zh | avg |" in printed and "de 2/3" in printed
    result = json.loads(out.read_text())
    f1 = result["summary"]["f1"]
    assert result["settings"]["mode"] == "generate" and result["items"] == 3
    assert all(value == 100.0 for value in f1["locality"].values())  # loc questions hold no bank subject
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3


def test_lafn_eval_scores_the_toy_edits_in_both_languages(tmp_path: Path) -> None:
    out = tmp_path / "enzh.json"
    assert main(["eval", "--model", "tiny-bilingual", "--data", str(ENZH), "--out", str(out),
                 "--mode", "teacher_forced"]) == 0  # layers: the toy's config pins 0, 1
    f1 = json.loads(out.read_text())["summary"]["f1"]
    # prompt, held-out rephrase and portability question all answer the new capital, in en and in zh
    assert {metric: (row["en"], row["zh"]) for metric, row in f1.items()} == {
        metric: (100.0, 100.0) for metric in ("reliability", "generality", "locality", "portability")}


def test_resume_gives_the_same_result(tokenizer: Any, trained_model: Any, tmp_path: Path) -> None:
    items = load_files([ENZH])
    settings = EvalSettings(mode="teacher_forced", protocol="sequential")
    config = LafnConfig(layers=(0, 1), steps=10)
    once = EditableCausalLM(trained_model, tokenizer)
    reference = evaluate(once, items, settings, tmp_path / "once.jsonl", config, progress=False)
    once.unwrap()

    def interrupt(index: int) -> None:
        if index == 0:
            raise KeyboardInterrupt

    model = EditableCausalLM(trained_model, tokenizer)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, items, settings, tmp_path / "twice.jsonl", config, progress=False, on_item=interrupt)
    resumed = evaluate(EditableCausalLM(model.unwrap(), tokenizer), items, settings, tmp_path / "twice.jsonl",
                       config, progress=False)
    assert resumed == reference
    assert len((tmp_path / "twice.jsonl").read_text().splitlines()) == 3


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_neuron_counts_plot_and_difference(trained_model: Any, tokenizer: Any, facts: dict[str, Any],
                                           tmp_path: Path) -> None:
    corpora = {lang: [t.format(s=f[lang]["subject"]) for f in facts["facts"][:10] for t in facts["templates"][lang]]
               for lang in ("en", "zh")}
    counts = count_factual_neurons(trained_model, tokenizer, corpora, beta=0.8)
    assert set(counts) == {"en", "zh", "shared"} and sorted(counts["shared"]) == [0, 1, 2, 3]
    assert all(counts["shared"][i] <= min(counts["en"][i], counts["zh"][i]) for i in range(4))
    plot_neuron_counts(counts, tmp_path / "counts.png")
    assert png_size(tmp_path / "counts.png") == (800, 400)
    sets = [torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4, 5]), torch.tensor([9])]
    matrix = neuron_set_difference(sets)
    assert torch.equal(matrix.diagonal(), torch.zeros(3, dtype=torch.float64))
    assert matrix[0, 1] == pytest.approx(1 - (2 / 3 + 2 / 4) / 2) and matrix[0, 2] == 1.0
    plot_difference_heatmap(matrix, ["a", "b", "c"], tmp_path / "dif.png")
    assert png_size(tmp_path / "dif.png") == (600, 500)


def test_resume_refuses_results_written_with_other_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    run = ["eval", "--model", "tiny-bilingual", "--data", str(ENZH), "--out", str(out), "--limit", "1"]
    assert main([*run, "--mode", "teacher_forced"]) == 0
    first = json.loads(out.read_text())
    capsys.readouterr()
    assert main([*run, "--mode", "generate"]) == 2
    err = capsys.readouterr().err
    assert "results.jsonl holds results of other settings: mode 'teacher_forced' there, 'generate' now" in err
    assert "--results" in err
    assert main([*run, "--mode", "teacher_forced", "--langs", "en"]) == 2
    assert "languages ['en', 'zh'] there, ['en'] now" in capsys.readouterr().err
    assert main([*run, "--mode", "teacher_forced", "--layers", "1,2"]) == 2
    assert "config (layers) differs" in capsys.readouterr().err
    assert json.loads(out.read_text()) == first  # nothing was overwritten
    assert main([*run, "--mode", "teacher_forced", "--limit", "2"]) == 0  # same settings: resumes and extends
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "results.jsonl.settings.json").read_text())["mode"] == "teacher_forced"
    assert main([*run, "--mode", "generate", "--results", str(tmp_path / "generate.jsonl")]) == 0
    settings_path = tmp_path / "results.jsonl.settings.json"
    older = json.loads(settings_path.read_text())
    for key in ("question_variants", "early_stop_on"):  # written before these keys existed: still resumes
        del older["config"][key]
    settings_path.write_text(json.dumps(older))
    assert main([*run, "--mode", "teacher_forced", "--limit", "2"]) == 0
    older["config"]["early_stop_on"] = "worst"  # a key it has is compared as it is
    settings_path.write_text(json.dumps(older))
    assert main([*run, "--mode", "teacher_forced", "--limit", "2"]) == 2
    assert "config (early_stop_on) differs" in capsys.readouterr().err


def test_results_without_settings_are_refused(tokenizer: Any, trained_model: Any, tmp_path: Path) -> None:
    (tmp_path / "old.jsonl").write_text('{"index": 0, "scores": {}, "error": null}\n', encoding="utf-8")
    model = EditableCausalLM(trained_model, tokenizer)
    with pytest.raises(ValueError, match="old.jsonl holds results without their settings"):
        evaluate(model, load_files([ENZH]), EvalSettings(), tmp_path / "old.jsonl", progress=False)


def test_a_corrupted_settings_file_is_a_clear_error(tokenizer: Any, trained_model: Any, tmp_path: Path) -> None:
    (tmp_path / "old.jsonl").write_text('{"index": 0, "scores": {}, "error": null}\n', encoding="utf-8")
    model = EditableCausalLM(trained_model, tokenizer)
    for broken, message in (("{not json", "cannot be read"), ('{"config": 3}', "is not a settings object")):
        (tmp_path / "old.jsonl.settings.json").write_text(broken, encoding="utf-8")
        with pytest.raises(ValueError, match=f"old.jsonl.settings.json {message}"):
            evaluate(model, load_files([ENZH]), EvalSettings(), tmp_path / "old.jsonl", progress=False)


def test_an_item_whose_subject_is_refused_is_scored_unedited(tokenizer: Any, trained_model: Any) -> None:
    record = ZsreRecord("the", "What is the capital of Marbrafi?", "Marbrafi's capital?", "Notes",
                        "What is the capital of Dorzotho?", "Thoselno")
    result = evaluate_item(EditableCausalLM(trained_model, tokenizer), 0, {"en": record},
                           EvalSettings(mode="teacher_forced"), LafnConfig(layers=(0, 1)))
    assert result["entry_id"] is None and "subject 'the' is refused" in result["error"]
    assert set(result["scores"]["en"]) == {"reliability", "generality", "locality"}
