from __future__ import annotations

import hashlib
import io
import sys
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lafn_hf import EditableCausalLM, EditGroup, LafnConfig, LanguageEdit
from lafn_hf.editing.locate import (
    count_activations,
    locate_neurons,
    locating_corpus,
    sample_continuations,
    select_frequent,
)
from lafn_hf.editing.optimize import _BaseRun, _losses, build_batch, sample_prefixes, selected_logits, upper_layers_only
from lafn_hf.editing.paraphrase import word_dropped_variants
from lafn_hf.editing.results import EditFailedError
from lafn_hf.editing.subject_span import resolve_group
from lafn_hf.values import LayerPlan, ValueInjection

from .conftest import TINY_DIR, fact_group, greedy

TINY = LafnConfig(layers=(0, 1), steps=60)


def weights_hash(model: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_edit_changes_the_fact_in_both_languages_and_leaves_other_facts_bitwise(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    templates, rows = facts["templates"], facts["facts"]
    editable = EditableCausalLM(trained_model, tokenizer)
    others = [templates[lang][0].format(s=rows[i][lang]["subject"]) for i in (5, 6, 7) for lang in ("en", "zh")]
    before = [greedy(editable, tokenizer, p) for p in others]
    weights = weights_hash(trained_model)
    result = editable.edit(fact_group(facts, source=0, target=1), TINY)  # templates 1-2 locate only (Eq. 3)
    assert weights_hash(trained_model) == weights
    for lang in ("en", "zh"):
        subject, target = rows[0][lang]["subject"], rows[1][lang]["object"]
        assert result.target_probabilities[lang] > 0.5
        # the edit prompt, the locating-only paraphrases and a template never used at all
        answers = [greedy(editable, tokenizer, template.format(s=subject)) for template in templates[lang]]
        assert all(answer.strip().startswith(target) for answer in answers), (lang, answers)
    assert [greedy(editable, tokenizer, p) for p in others] == before
    editable.remove_edit(result.entry_id)
    for lang in ("en", "zh"):
        prompt = templates[lang][3].format(s=rows[0][lang]["subject"])
        assert greedy(editable, tokenizer, prompt).strip().startswith(rows[0][lang]["object"])


def test_edit_result_reports_the_run(trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    result = editable.edit(fact_group(facts, 2, 3), LafnConfig(layers=(0, 1), steps=3, early_stop_loss=0.0,
                                                                  min_target_probability=0.0))
    assert result.layers == (0, 1) and result.steps == 3 and len(result.loss_curve) == 4
    assert set(result.neuron_counts) == {"en", "zh"}
    for layer, shared in result.shared_counts.items():
        assert 0 < shared <= min(result.neuron_counts[lang][layer] for lang in ("en", "zh"))
    entry = editable.bank.get(result.entry_id)
    assert entry.subjects == {"en": facts["facts"][2]["en"]["subject"], "zh": facts["facts"][2]["zh"]["subject"]}
    assert entry.metadata["targets"]["en"] == facts["facts"][3]["en"]["object"]


def test_located_sets_are_deterministic_and_nested(trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    group = fact_group(facts, 0, 1)
    first = locate_neurons(trained_model, tokenizer, group, (0, 1, 2), TINY)
    second = locate_neurons(trained_model, tokenizer, group, (0, 1, 2), TINY)
    for layer in (0, 1, 2):
        assert torch.equal(first.shared[layer], second.shared[layer])
        for lang in ("en", "zh"):
            assert torch.isin(first.shared[layer], first.per_language[lang][layer]).all()
    strict = locate_neurons(trained_model, tokenizer, group, (0, 1, 2), LafnConfig(beta=0.9))
    assert all(strict.shared[layer].numel() < first.shared[layer].numel() for layer in (0, 1, 2))
    random = locate_neurons(trained_model, tokenizer, group, (0, 1, 2), LafnConfig(locate_strategy="random"))
    assert random.shared_counts() == first.shared_counts()
    assert not all(torch.equal(random.shared[layer], first.shared[layer]) for layer in (0, 1, 2))
    everything = locate_neurons(trained_model, tokenizer, group, (0,), LafnConfig(locate_strategy="all"))
    assert everything.shared[0].tolist() == list(range(256))


def test_sampled_continuations_extend_the_locating_corpus_seeded(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    group = fact_group(facts, 0, 1)
    config = LafnConfig(layers=(0, 1), locate_samples=3, locate_sample_tokens=4)
    samples = sample_continuations(trained_model, tokenizer, group, config)
    assert samples == sample_continuations(trained_model, tokenizer, group, config)  # seeded
    for lang, edit in group.edits.items():
        assert 1 <= len(samples[lang]) <= 3
        assert all(text.startswith(edit.prompt) and len(text) > len(edit.prompt) for text in samples[lang])
        corpus = locating_corpus(group, config, lang, samples[lang])
        assert corpus[: 1 + len(edit.paraphrases)] == [edit.prompt, *edit.paraphrases] and len(corpus) > 1
    counts = count_activations(trained_model, tokenizer, corpus, (1,))
    plain = count_activations(trained_model, tokenizer, locating_corpus(group, config, "zh"), (1,))
    assert counts[1].sum() > plain[1].sum()  # the samples' tokens are counted too (Eq. 3)
    assert sample_continuations(trained_model, tokenizer, group, LafnConfig()) == {"en": [], "zh": []}
    with pytest.raises(ValueError, match="locate_samples"):
        LafnConfig(locate_samples=-1)


def test_beta_zero_keeps_every_neuron_that_fired(trained_model: Any, tokenizer: Any) -> None:
    counts = count_activations(trained_model, tokenizer, ["The capital of", "首都是"], (1,))
    assert torch.equal(select_frequent(counts[1], 0.0), torch.nonzero(counts[1] > 0).flatten())
    longest = max(len(tokenizer(text)["input_ids"]) for text in ("The capital of", "首都是"))
    assert counts[1].max() <= 2 * longest
    assert select_frequent(torch.zeros(4, dtype=torch.int64), 0.1).numel() == 0


def test_upper_layer_shortcut_gives_the_full_forward_loss(trained_model: Any, tokenizer: Any,
                                                         facts: dict[str, Any]) -> None:
    group = fact_group(facts, 0, 1)
    config = LafnConfig(layers=(2, 3))
    batch = build_batch(tokenizer, group, sample_prefixes(trained_model, tokenizer, group.languages, config), config,
                        torch.device("cpu"))
    rows = torch.cat([batch.target_rows, batch.kl_rows])
    positions = torch.cat([batch.target_positions - 1, batch.kl_positions])
    neurons = {2: torch.arange(0, 256, 2), 3: torch.arange(1, 256, 3)}
    generator = torch.Generator().manual_seed(0)
    plan = {layer: LayerPlan.build(batch.subject_hits, idx, torch.randn(idx.numel(), generator=generator))
            for layer, idx in neurons.items()}
    with torch.no_grad():
        base = _BaseRun(trained_model, batch, (2, 3))
        with ValueInjection(trained_model, (2, 3)) as injection:
            injection.plan = plan
            full = _losses(selected_logits(trained_model, batch.input_ids, batch.attention_mask, rows, positions),
                           batch, base, LafnConfig())
            with upper_layers_only(trained_model, 2, base.hidden_in):
                short = _losses(selected_logits(trained_model, batch.input_ids, batch.attention_mask, rows,
                                                positions), batch, base, LafnConfig())
    assert float(full[2]) > 0  # the random dV moves the KL term
    for a, b in zip(full, short):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(trained_model.model.layers[0], type(trained_model.model.layers[3]))


def test_bad_input_is_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match="subject 'Paris' does not occur in prompt 'The capital of France is'"):
        resolve_group(EditGroup({"en": LanguageEdit("The capital of France is", "Paris", "Rome")}))
    with pytest.raises(ValueError, match="target must be a non-empty string, got ''"):
        LanguageEdit("The capital of France is", "France", "")
    with pytest.raises(ValueError, match="language 'en' is listed twice"):
        EditGroup.from_json('{"en": {"prompt": "A x", "subject": "x", "target": "y"},'
                            ' "en": {"prompt": "B x", "subject": "x", "target": "z"}}')
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['answer'\]"):
        EditGroup.from_dict({"en": {"prompt": "A x", "subject": "x", "target": "y", "answer": "z"}})
    with pytest.raises(ValueError, match="beta must be in \\[0, 1\\), got 1.5"):
        LafnConfig(beta=1.5)
    with pytest.raises(ValueError, match="locate_strategy must be one of"):
        LafnConfig(locate_strategy="best")


def test_config_json_round_trip_and_unknown_keys(caplog: pytest.LogCaptureFixture) -> None:
    config = LafnConfig(layers=(3, 1), kl_templates={"en": "{subject} was a"}, steps=7)
    assert LafnConfig.from_json(config.to_json()) == config
    assert config.layers == (1, 3)
    restored = LafnConfig.from_dict({**config.to_dict(), "from_the_future": 1})
    assert restored == config and "from_the_future" in caplog.text
    assert config.kl_prompt("en", "Rome") == "Rome was a" and config.kl_prompt("zh", "罗马") == "罗马是一个"


def test_edit_many_keeps_going_after_a_failure(trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    good = fact_group(facts, 0, 1)
    outcome = editable.edit_many([good, good], LafnConfig(layers=(0, 9), steps=1), progress=False)
    assert outcome.results == [] and [i for i, _ in outcome.failures] == [0, 1]
    assert "out of range" in outcome.failures[0][1]
    outcome = editable.edit_many([good, fact_group(facts, 2, 3)],
                                 LafnConfig(layers=(0, 1), steps=1, min_target_probability=0.0), progress=False)
    assert len(outcome.results) == 2 and len(editable.bank) == 2


def test_an_edit_that_does_not_take_raises_and_stores_nothing(trained_model: Any, tokenizer: Any,
                                                              facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    subject = facts["facts"][0]["en"]["subject"]
    invisible = EditGroup({"en": LanguageEdit(facts["templates"]["en"][0].format(s=subject), subject, "\u200b")})
    expected = r"did not take: p\(target\) \{'en': \d\.\d+e-\d\d\} after 60 steps; \['en'\] < min_target_probability 0.01"
    with pytest.raises(EditFailedError, match=expected + "; nothing was stored") as failed:
        editable.edit(invisible, TINY)
    assert failed.value.target_probabilities["en"] < 1e-15 and isinstance(failed.value, ValueError)
    assert len(editable.bank) == 0
    result = editable.edit(invisible, LafnConfig(layers=(0, 1), steps=60, min_target_probability=0.0))  # opt out
    assert result.target_probabilities["en"] < 1e-15 and len(editable.bank) == 1
    outcome = editable.edit_many([invisible, fact_group(facts, 2, 3)], TINY, progress=False)
    assert [i for i, _ in outcome.failures] == [0] and len(outcome.results) == 1
    assert "EditFailedError: the edit did not take" in outcome.failures[0][1]


def test_a_prompt_longer_than_the_context_is_refused_before_locating(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    monkeypatch.setattr("lafn_hf.editing.pipeline.locate_neurons",
                        lambda *args: pytest.fail("located a prompt that cannot fit"))
    subject = facts["facts"][0]["en"]["subject"]
    long_prompt = "Notes on travel. " * 20 + facts["templates"]["en"][0].format(s=subject)
    group = EditGroup({"en": LanguageEdit(long_prompt, subject, "Notes")})
    with pytest.raises(ValueError, match=r"language 'en': the prompt, its target and a 5-token prefix take \d+ tokens;"
                                         r" the model handles at most 64 positions \(max_position_embeddings\)"):
        editable.edit(group, TINY)
    paraphrase = EditGroup({"en": LanguageEdit(f"{subject} is in", subject, "Notes", (long_prompt,))})
    with pytest.raises(ValueError, match=r"language 'en': paraphrase 0 takes \d+ tokens; the model handles at most 64"):
        editable.edit(paraphrase, TINY)
    assert len(editable.bank) == 0



def test_a_trained_paraphrase_must_fit_with_its_target(trained_model: Any, tokenizer: Any, facts: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A paraphrase that fits alone but not followed by its target is refused once it is trained, even past
    num_paraphrases (a training row that long would run past the model's positions)."""
    editable = EditableCausalLM(trained_model, tokenizer)
    subject = facts["facts"][0]["en"]["subject"]
    target = "Notes on the travel of the year"
    paraphrase = facts["templates"]["en"][0].format(s=subject)
    while len(tokenizer(paraphrase + " " + target)["input_ids"]) <= 64:
        paraphrase = "Notes on travel. " + paraphrase
    assert len(tokenizer(paraphrase)["input_ids"]) <= 64
    group = EditGroup({"en": LanguageEdit(f"{subject} is in", subject, target, ("x " + subject, paraphrase))})
    monkeypatch.setattr("lafn_hf.editing.pipeline.locate_neurons",
                        lambda *args: pytest.fail("located a row that cannot fit"))
    for config in (LafnConfig(layers=(0, 1), train_paraphrases=2),
                   LafnConfig(layers=(0, 1), train_paraphrases=2, num_paraphrases=1)):
        with pytest.raises(ValueError, match=r"language 'en': paraphrase 1 and its target take \d+ tokens; the model "
                                             r"handles at most 64 positions"):
            editable.edit(group, config)
    monkeypatch.undo()
    editable.edit(group, LafnConfig(layers=(0, 1), steps=2, train_paraphrases=1, min_target_probability=0.0))
    assert len(editable.bank) == 1


def test_metadata_may_not_overwrite_what_edit_records(trained_model: Any, tokenizer: Any,
                                                      facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    for metadata in ({"written_paraphrases": {"en": ["mine"]}}, {"note": 1, "targets": {}}):
        with pytest.raises(ValueError, match=r"metadata keys \['(written_paraphrases|targets)'\] are written by "
                                             r"edit\(\) itself"):
            editable.edit(fact_group(facts, 0, 1), TINY, metadata=metadata)
    with pytest.raises(TypeError, match="metadata must be a dict, got list"):
        editable.edit(fact_group(facts, 0, 1), TINY, metadata=[("note", 1)])  # type: ignore[arg-type]
    assert len(editable.bank) == 0
    result = editable.edit(fact_group(facts, 0, 1), LafnConfig(layers=(0, 1), steps=2, min_target_probability=0.0),
                           metadata={"note": 1})
    assert editable.bank.get(result.entry_id).metadata["note"] == 1

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_edit_shows_progress_on_a_terminal_only(trained_model: Any, tokenizer: Any, facts: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    config = LafnConfig(layers=(0, 1), steps=2, early_stop_loss=0.0, min_target_probability=0.0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    editable.edit(fact_group(facts, 0, 1), config)
    assert "LAFN dV" in terminal.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    editable.edit(fact_group(facts, 0, 1), config)
    assert pipe.getvalue() == ""
    editable.edit(fact_group(facts, 0, 1), config, progress=True)
    assert "LAFN dV" in pipe.getvalue()
    terminal.truncate(0)
    monkeypatch.setattr(sys, "stderr", terminal)
    editable.edit(fact_group(facts, 0, 1), config, progress=False)
    assert terminal.getvalue() == ""


def test_results_bank_entries_and_banks_have_short_reprs(trained_model: Any, tokenizer: Any,
                                                         facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    result = editable.edit(fact_group(facts, 2, 3), LafnConfig(layers=(0, 1), steps=2, min_target_probability=0.0))
    entry = editable.bank.get(result.entry_id)
    subjects = {"en": facts["facts"][2]["en"]["subject"], "zh": facts["facts"][2]["zh"]["subject"]}
    counts = {layer: int(update.neurons.numel()) for layer, update in entry.updates.items()}
    assert entry.key is not None
    assert repr(entry) == (f"BankEntry(id={entry.id!r}, subjects={subjects!r}, layers=[0, 1], neurons={counts!r}, "
                           f"key@0>{entry.key.threshold:.3f}, scope@0-0.10)")
    assert repr(result).startswith(f"EditResult(entry_id={entry.id!r}, subjects={subjects!r}, layers=(0, 1), "
                                   f"shared_neurons={result.shared_counts!r}, steps=2, p(target)=")
    assert repr(editable.bank) == f"EditBank(1 entry, layers=[0, 1]: {entry.id} {subjects!r})"
    for text in (repr(entry), repr(result), repr(editable.bank)):
        assert "tensor" not in text and len(text) < 300
    for source in range(3, 9):
        editable.edit(fact_group(facts, source, 0), LafnConfig(layers=(0, 1), steps=1, min_target_probability=0.0))
    assert repr(editable.bank).startswith("EditBank(7 entries, layers=[0, 1]: ") and repr(editable.bank).endswith(
        ", ... 4 more)")


def test_editing_a_half_precision_model_on_cpu_warns(tokenizer: Any, facts: dict[str, Any],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.bfloat16).eval()
    editable = EditableCausalLM(model, tokenizer)
    editable.edit(fact_group(facts, 0, 1), LafnConfig(layers=(0, 1), steps=1, min_target_probability=0.0))
    assert "editing a torch.bfloat16 model on the CPU" in caplog.text and "dtype=torch.float32" in caplog.text


def test_answer_boundary_trains_the_punctuation_that_ends_the_models_own_answer(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    from lafn_hf.editing.optimize import answer_boundaries

    group = fact_group(facts, 0, 1)
    boundaries = answer_boundaries(trained_model, tokenizer, group)
    assert boundaries == {"en": ".", "zh": "。"}  # the toy ends its answers "Thobra." / "...城。"
    config = LafnConfig(num_prefixes=0)
    plain = build_batch(tokenizer, group, {}, config, torch.device("cpu"))
    bounded = build_batch(tokenizer, group, {}, config, torch.device("cpu"), boundaries)
    assert bounded.target_ids.numel() == plain.target_ids.numel() + 2
    ends = {int(bounded.target_ids[i]) for i in range(bounded.target_ids.numel())} - set(plain.target_ids.tolist())
    assert {tokenizer.decode([t]) for t in ends} == {".", "。"}
    ended = EditGroup({"en": LanguageEdit(group.edits["en"].prompt, group.edits["en"].subject, "Notes.")})
    assert build_batch(tokenizer, ended, {}, config, torch.device("cpu"), boundaries).target_ids.numel() == \
        build_batch(tokenizer, ended, {}, config, torch.device("cpu")).target_ids.numel()  # no second "."
    editable = EditableCausalLM(trained_model, tokenizer)
    result = editable.edit(group, LafnConfig(answer_boundary=True))
    assert greedy(editable, tokenizer, group.edits["en"].prompt).strip().startswith(f"{group.edits['en'].target}.")
    assert result.target_probabilities["en"] > 0.3


def test_answer_ending_is_the_punctuation_right_after_the_first_word() -> None:
    from lafn_hf.editing.optimize import answer_ending

    cases = {" Paris, France.": ",", "巴黎。是": "。", "法国巴黎的塔楼上，是": "，", " Rom.\n": ".",
             "Jean-Pierre Dupont.": "", "l'Italie.": ".", "(Rome)": "", "Paris is the capital.": "", "": "",
             "Rome": "", "Rome's capital": ""}
    assert {answer: answer_ending(answer) for answer in cases} == cases


def test_edits_of_one_model_sample_the_prefixes_once_and_equal_fresh_edits(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import lafn_hf.editing.optimize as optimize

    config = LafnConfig(layers=(0, 1), steps=4, early_stop_loss=0.0, min_target_probability=0.0)
    fresh = []
    for source in (2, 4):
        wrapped = EditableCausalLM(trained_model, tokenizer)
        fresh.append(wrapped.edit(fact_group(facts, source, source + 1), config))
        wrapped.unwrap()
    calls = []
    monkeypatch.setattr(optimize, "sample_prefixes", lambda *a: calls.append(a) or sample_prefixes(*a))
    editable = EditableCausalLM(trained_model, tokenizer)
    shared = [editable.edit(fact_group(facts, s, s + 1), config) for s in (2, 4)]
    assert len(calls) == 1
    for one, other in zip(fresh, shared):
        assert one.loss_curve == other.loss_curve and one.target_probabilities == other.target_probabilities
    prefixes = optimize.PrefixCache()
    two = prefixes.get(trained_model, tokenizer, ["en", "zh"], config)
    assert two == sample_prefixes(trained_model, tokenizer, ["en", "zh"], config)
    assert prefixes.get(trained_model, tokenizer, ["de", "fr"], config) == {"de": two["en"], "fr": two["zh"]}
    assert len(calls) == 2 and repr(prefixes) == "PrefixCache(1 of 32)"


def test_a_target_no_punctuation_ends_trains_the_end_of_its_word(trained_model: Any, tokenizer: Any,
                                                                 facts: dict[str, Any]) -> None:
    """Where the model's own answer has no punctuation after its first word, a target of a spaced script is
    trained to end its word: "Krieg" must not read on into "Krieger" (the loss of ``WORD_END``)."""
    from lafn_hf.editing.optimize import WORD_END, sequence_losses
    from lafn_hf.tokens import word_continuations

    continues = word_continuations(tokenizer)
    piece = {text: tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Thobra", " Thobra", ".")}
    assert continues[piece["Thobra"]].all() and not continues[piece[" Thobra"][0]] and not continues[piece["."][0]]
    assert not continues[tokenizer.eos_token_id] and word_continuations(tokenizer) is continues
    group = fact_group(facts, 0, 1)
    config = LafnConfig(num_prefixes=2)
    prefixes = {lang: ["a b", "c d"] for lang in group.languages}
    cpu = torch.device("cpu")
    plain = build_batch(tokenizer, group, prefixes, config, cpu, {"en": "", "zh": ""})
    ends = (plain.target_ids == WORD_END).nonzero().flatten()
    assert [plain.sequence_language[int(s)] for s in plain.target_sequence[ends]] == ["en"] * 3  # not zh: 城 ends
    for i in ends.tolist():  # one past the row's last token: its logits are read at the last target token
        row = int(plain.target_rows[i])
        assert int(plain.target_positions[i]) == int(plain.attention_mask[row].sum())
    assert plain.continues_word is not None and torch.equal(plain.continues_word, continues)
    for boundaries in ({"en": ".", "zh": "。"}, None):
        assert WORD_END not in build_batch(tokenizer, group, prefixes, config, cpu, boundaries).target_ids.tolist()
    logits = torch.randn(plain.target_ids.numel() + len(group.languages), len(tokenizer),
                         generator=torch.Generator().manual_seed(0))
    total, _, _, fit = sequence_losses(logits, plain)
    probs = logits.softmax(-1)
    by_hand = torch.zeros_like(total)
    for i, (token, sequence) in enumerate(zip(plain.target_ids.tolist(), plain.target_sequence.tolist())):
        p = probs[i, ~continues].sum() if token == WORD_END else probs[i, token]
        by_hand[sequence] -= torch.log(p)
    assert torch.allclose(total, by_hand, atol=1e-5)
    own = [i for i, token in enumerate(plain.target_ids.tolist()) if token != WORD_END]
    fit_by_hand = torch.stack([torch.stack([-torch.log(probs[i, plain.target_ids[i]]) for i in own
                                            if int(plain.target_sequence[i]) == s]).mean()
                               for s in range(len(plain.sequence_language))])
    assert torch.allclose(fit, fit_by_hand, atol=1e-5)  # the target's own tokens: what early stopping reads


def test_early_stopping_reads_the_targets_own_tokens_not_the_answers_end(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    """An ending trained after the target (".", WORD_END) is nearly free to fit; averaged in, it let the target
    loss pass ``early_stop_loss`` before the target itself did (en+fr dev items 0-39: 19 edits stopped earlier
    with the word end than without, and 5 rephrasings that had answered right no longer did)."""
    from lafn_hf.editing.optimize import _BaseRun, _losses, optimize_update

    group = fact_group(facts, 0, 1)
    config = LafnConfig(num_prefixes=0, steps=1, early_stop_loss=0.0)
    cpu = torch.device("cpu")
    batch = build_batch(tokenizer, group, {}, config, cpu, {"en": ".", "zh": "。"})
    assert batch.ending is not None
    assert {tokenizer.decode([int(t)]) for t in batch.target_ids[batch.ending]} == {".", "。"}
    rows = torch.cat([batch.target_rows, batch.kl_rows])
    positions = torch.cat([batch.target_positions - 1, batch.kl_positions])
    with torch.no_grad():
        logits = selected_logits(trained_model, batch.input_ids, batch.attention_mask, rows, positions)
        total, target_loss, _, fit = _losses(logits, batch, _BaseRun(trained_model, batch, (2,)), config)
    assert float(fit) > float(target_loss)  # the endings are easier than the target
    neurons = {2: torch.arange(0, 256, 2)}
    result = optimize_update(trained_model, tokenizer, group, neurons, config)
    assert result.target_loss_curve[0] == pytest.approx(float(fit), rel=1e-5)


def test_early_stop_on_worst_waits_until_every_language_fits(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    """``early_stop_on="worst"``: optimisation stops once the worst training sequence's NLL is below
    ``early_stop_loss``; the mean lets one language stop the edit while another is still above it."""
    from lafn_hf.editing.optimize import optimize_update

    group = fact_group(facts, 4, 5)
    neurons = {0: torch.arange(0, 256), 1: torch.arange(0, 256)}

    def run(on: str, steps: int = 60) -> Any:
        config = LafnConfig(num_prefixes=0, steps=steps, early_stop_loss=1.0, early_stop_on=on)
        return optimize_update(trained_model, tokenizer, group, neurons, config)

    mean, worst = run("mean"), run("worst")
    assert worst.target_loss_curve[0] > mean.target_loss_curve[0]  # dV = 0 in both: the max over the mean
    assert mean.steps < worst.steps < 60 and worst.target_loss_curve[-1] < 1.0
    where_mean_stopped = run("worst", steps=mean.steps)  # the same trajectory, read by its worst sequence
    assert where_mean_stopped.target_loss_curve[-1] > 1.0 > mean.target_loss_curve[-1]
    with pytest.raises(ValueError, match="early_stop_on must be one of"):
        LafnConfig(early_stop_on="max")


def test_question_variants_are_trained_beside_the_prompt(tokenizer: Any, facts: dict[str, Any]) -> None:
    """``question_variants``: each language also trains its prompt with one word outside the subject left
    out; the reported probability stays the bare prompt's and every row has its subject hit."""
    group = fact_group(facts, 0, 1)
    prefixes = {lang: ["a b"] for lang in group.languages}
    cpu = torch.device("cpu")
    plain = build_batch(tokenizer, group, prefixes, LafnConfig(num_prefixes=1, question_variants=0), cpu)
    varied = build_batch(tokenizer, group, prefixes, LafnConfig(num_prefixes=1, question_variants=2), cpu)
    assert varied.sequence_language == ["en"] * 4 + ["zh"] * 4 and plain.sequence_language == ["en"] * 2 + ["zh"] * 2
    assert varied.report_sequence == {"en": 3, "zh": 7}
    texts = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
             for row, mask in zip(varied.input_ids, varied.attention_mask)]
    variants = word_dropped_variants("The capital of Marbrafi is", "Marbrafi", 2)
    assert len(variants) == 2 and texts[:2] == [f"{v} Notes" for v in variants]
    assert texts[3].startswith("The capital of Marbrafi is") and texts[7].startswith("多塞里国的首都是")
    assert len({row for row, _ in varied.subject_hits}) == varied.input_ids.shape[0]  # KL rows too
    with pytest.raises(ValueError, match="question_variants must be >= 0"):
        LafnConfig(question_variants=-1)
