from __future__ import annotations

from typing import Any

import pytest
import torch

from lafn_hf import EditableCausalLM, EditGroup, LafnConfig, LanguageEdit
from lafn_hf.editing.optimize import build_batch
from lafn_hf.editing.self_paraphrase import REWRITE_SHOTS, pick_paraphrases, rewrite_prompt, write_paraphrases

from .conftest import fact_group

PROMPT = "Who directed the film Casablanca?"


def test_pick_keeps_rewrites_that_still_ask_the_question() -> None:
    candidates = [
        " Who directed the film Casablanca?\nQuestion: x",  # the prompt itself
        " Who was the director of the film Casablanca?\nQuestion: y",  # kept: its first line
        " Where is Casablanca?",  # asks something else: shares none of the prompt's other words
        " Who directed the film?",  # no subject
        " Who directed the film Casablanca",  # not a question
        " Who was the director of the film Casablanca?",  # a repeat
        " Who directed the movie that is called Casablanca and was released in 1942 in the US?",  # too long
        " Which film director directed Casablanca?",
        " Who directed the film Casablanca in the end?",
    ]
    assert pick_paraphrases(candidates, PROMPT, "Casablanca", 5) == [
        "Who was the director of the film Casablanca?", "Which film director directed Casablanca?",
        "Who directed the film Casablanca in the end?"]
    assert pick_paraphrases(candidates, PROMPT, "Casablanca", 1) == ["Who was the director of the film Casablanca?"]
    assert pick_paraphrases(["卡萨布兰卡的导演是谁？", "卡萨布兰卡在哪里？"], "谁执导了卡萨布兰卡？", "卡萨布兰卡", 3) == [
        "卡萨布兰卡的导演是谁？"]


def test_rewrite_prompt_shows_three_examples_then_asks() -> None:
    text = rewrite_prompt("fr", "Qui a écrit Candide ?")
    assert text.count("Question :") == 4 and text.endswith("Question : Qui a écrit Candide ?\nLa même question autrement :")
    assert set(REWRITE_SHOTS) >= {"en", "de", "fr", "zh"}


class ScriptedModel(torch.nn.Module):
    """``generate`` returns each row followed by the next scripted continuation (tokenised), padded."""

    def __init__(self, tokenizer: Any, continuations: list[str]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.continuations, self.calls = tokenizer, continuations, []  # type: ignore[var-annotated]

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls.append(kwargs)
        rows = input_ids.repeat_interleave(kwargs["num_return_sequences"], dim=0)
        new = [self.tokenizer(self.continuations[i % len(self.continuations)], add_special_tokens=False)["input_ids"]
               for i in range(rows.shape[0])]
        width = max(map(len, new))
        tail = torch.tensor([ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids in new])
        return torch.cat([rows, tail], dim=1)


def group_of(**paraphrases: tuple[str, ...]) -> EditGroup:
    sides = {"en": ("Who directed the film Casablanca?", "Casablanca"), "zh": ("谁执导了卡萨布兰卡？", "卡萨布兰卡"),
             "ja": ("カサブランカの監督は誰？", "カサブランカ")}
    return EditGroup({lang: LanguageEdit(prompt, subject, "Orson Welles", paraphrases.get(lang, ()))
                      for lang, (prompt, subject) in sides.items()})


def test_write_paraphrases_fills_languages_without_any(tokenizer: Any) -> None:
    """Languages with shots and no paraphrases get the model's rewrites (sampled until a line break, with the
    config's seed); given paraphrases and languages without shots stay as they are."""
    model = ScriptedModel(tokenizer, [" Who was the director of the film Casablanca?\n", " Where is Casablanca?\n",
                                      " 卡萨布兰卡是谁执导的？\n"])
    given = ("Casablanca was directed by whom?",)
    group = group_of(zh=given)
    written = write_paraphrases(model, tokenizer, group, LafnConfig(write_paraphrases=2))
    assert written.edits["en"].paraphrases == ("Who was the director of the film Casablanca?",)
    assert written.edits["zh"].paraphrases == given and written.edits["ja"] == group.edits["ja"]
    (call,) = model.calls
    assert call["num_return_sequences"] == 6 and call["do_sample"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert set(call["eos_token_id"]) >= {tokenizer.eos_token_id, *newline}
    assert write_paraphrases(model, tokenizer, group, LafnConfig()) is group and len(model.calls) == 1
    with pytest.raises(ValueError, match="write_paraphrases must be >= 0"):
        LafnConfig(write_paraphrases=-1)


def test_trained_paraphrases_are_rows_beside_the_prompt(tokenizer: Any, facts: dict[str, Any]) -> None:
    base = fact_group(facts, 0, 1)
    extra = {"en": ("Marbrafi has the capital", "The capital city of Marbrafi is"), "zh": ()}
    group = EditGroup({lang: LanguageEdit(e.prompt, e.subject, e.target, extra[lang])
                       for lang, e in base.edits.items()})
    prefixes = {lang: ["a b"] for lang in group.languages}
    cpu = torch.device("cpu")
    batch = build_batch(tokenizer, group, prefixes, LafnConfig(num_prefixes=1, train_paraphrases=1), cpu)
    texts = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
             for row, mask in zip(batch.input_ids, batch.attention_mask)]
    assert batch.sequence_language == ["en"] * 3 + ["zh"] * 2 and batch.report_sequence == {"en": 2, "zh": 4}
    assert texts[0].startswith("Marbrafi has the capital ") and texts[2].startswith("The capital of Marbrafi is")
    untrained = build_batch(tokenizer, group, prefixes, LafnConfig(num_prefixes=1), cpu)
    assert untrained.sequence_language == ["en"] * 2 + ["zh"] * 2
    with pytest.raises(ValueError, match="train_paraphrases must be >= 0"):
        LafnConfig(train_paraphrases=-1)


def test_edit_locates_on_written_paraphrases_and_records_them(trained_model: Any, tokenizer: Any,
                                                                facts: dict[str, Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """edit() asks for paraphrases before locating; those written are named in the entry's metadata."""
    group = fact_group(facts, 0, 1)
    seen: list[EditGroup] = []

    def write(model: Any, tokenizer: Any, group: EditGroup, config: LafnConfig) -> EditGroup:
        en = group.edits["en"]
        written = (f"{en.subject}'s capital is",)
        return EditGroup({**group.edits, "en": LanguageEdit(en.prompt, en.subject, en.target, written)})

    def locate(model: Any, tokenizer: Any, group: EditGroup, layers: Any, config: LafnConfig) -> Any:
        seen.append(group)
        return real_locate(model, tokenizer, group, layers, config)

    import lafn_hf.editing.pipeline as model_module  # where edit() calls them

    real_locate = model_module.locate_neurons
    monkeypatch.setattr(model_module, "write_paraphrases", write)
    monkeypatch.setattr(model_module, "locate_neurons", locate)
    editable = EditableCausalLM(trained_model, tokenizer)
    config = LafnConfig(num_prefixes=0, steps=3, min_target_probability=0.0, write_paraphrases=1)
    result = editable.edit(group, config)
    subject = group.edits["en"].subject
    assert seen[0].edits["en"].paraphrases == (f"{subject}'s capital is",)
    assert editable.bank.get(result.entry_id).metadata["written_paraphrases"] == {"en": [f"{subject}'s capital is"]}
    other = fact_group(facts, 2, 3)
    batched = editable.edit_many([other], config, batch_size=2)
    assert editable.bank.get(batched.results[0].entry_id).metadata["written_paraphrases"] == {
        "en": [f"{other.edits['en'].subject}'s capital is"]}


def test_written_paraphrases_fit_the_model_with_their_target(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite that could not be trained followed by its target is not kept; where the rewrite request itself
    cannot fit, nothing is asked."""
    from lafn_hf.editing.preflight import answered_length

    long, short = "Who was the director of the film Casablanca?", "Who directed Casablanca?"
    target = " ".join(["Orson Welles"] * 40)
    edit = LanguageEdit("Who directed the film Casablanca?", "Casablanca", target)
    group = EditGroup({"en": edit})
    limit = answered_length(tokenizer, long, target) - 1
    asked = len(tokenizer(rewrite_prompt("en", edit.prompt))["input_ids"]) + 2 * len(tokenizer(edit.prompt)["input_ids"])
    assert answered_length(tokenizer, short, target) <= limit and asked + 8 <= limit
    monkeypatch.setattr(tokenizer, "model_max_length", limit)
    model = ScriptedModel(tokenizer, [f" {long}\n", f" {short}\n"])
    written = write_paraphrases(model, tokenizer, group, LafnConfig(write_paraphrases=1))
    assert written.edits["en"].paraphrases == (short,)
    monkeypatch.setattr(tokenizer, "model_max_length", asked + 7)
    assert write_paraphrases(model, tokenizer, group, LafnConfig(write_paraphrases=1)) is group
    assert len(model.calls) == 1
