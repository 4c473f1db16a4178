"""edit_many(batch_size=B): B groups optimised in one forward per step equal one-at-a-time edits."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch

from lafn_hf import EditableCausalLM, LafnConfig

from .conftest import fact_group


def banks_of(trained_model: Any, tokenizer: Any, groups: list[Any], config: LafnConfig, batch_size: int) -> Any:
    editable = EditableCausalLM(trained_model, tokenizer)
    outcome = editable.edit_many(groups, config, batch_size=batch_size)
    editable.unwrap()
    return outcome, editable.bank


@pytest.mark.parametrize(("early_stop_on", "early_stop_loss"), [("mean", 2.0), ("worst", 3.0)])
def test_batched_edits_equal_one_at_a_time(tokenizer: Any, facts: dict[str, Any], early_stop_on: str,
                                           early_stop_loss: float) -> None:
    from transformers import AutoModelForCausalLM

    from .conftest import TINY_DIR

    groups = [fact_group(facts, source, source + 20) for source in range(5)]
    config = LafnConfig(steps=12, early_stop_loss=early_stop_loss, early_stop_on=early_stop_on,
                        min_target_probability=0.0)  # groups stop at steps 4-12
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR).eval()
    single, single_bank = banks_of(model, tokenizer, groups, config, 1)
    packed, packed_bank = banks_of(model, tokenizer, groups, config, 4)  # a batch of 4, then one of 1
    assert not single.failures and not packed.failures
    assert len({result.steps for result in single.results}) > 1  # the batch was packed again as groups stopped
    for a, b in zip(single.results, packed.results):
        assert a.steps == b.steps and a.shared_counts == b.shared_counts
        assert b.target_loss_curve == pytest.approx(a.target_loss_curve, abs=2e-3)  # what early stopping read
        for lang, p in a.target_probabilities.items():
            assert b.target_probabilities[lang] == pytest.approx(p, abs=2e-3)
        first, second = single_bank.get(a.entry_id), packed_bank.get(b.entry_id)
        for layer, update in first.updates.items():
            assert torch.equal(update.neurons, second.updates[layer].neurons)
            torch.testing.assert_close(update.delta, second.updates[layer].delta, atol=2e-2, rtol=0)
        assert first.key is not None and second.key is not None
        torch.testing.assert_close(first.key.vector, second.key.vector)


def test_a_failing_group_does_not_stop_its_batch(trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    groups: list[Any] = [fact_group(facts, 0, 1), "not a group", fact_group(facts, 2, 3)]
    config = LafnConfig(steps=4, min_target_probability=0.0)
    outcome = EditableCausalLM(trained_model, tokenizer).edit_many(groups, config, batch_size=3)
    assert [index for index, _ in outcome.failures] == [1] and "TypeError" in outcome.failures[0][1]
    assert len(outcome.results) == 2
    strict = LafnConfig(steps=1, min_target_probability=0.999)  # one step cannot reach p 0.999
    editable = EditableCausalLM(trained_model.__class__.from_pretrained(tokenizer.name_or_path).eval(), tokenizer)
    refused = editable.edit_many([fact_group(facts, 4, 5), fact_group(facts, 6, 7)], strict, batch_size=2)
    assert [index for index, _ in refused.failures] == [0, 1] and len(editable.bank) == 0
    assert all("EditFailedError" in message for _, message in refused.failures)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        editable.edit_many([], strict, batch_size=0)


def test_answer_boundaries_of_many_groups_come_from_one_left_padded_generate(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from lafn_hf import EditGroup, LanguageEdit
    from lafn_hf.editing.optimize import answer_boundaries_many, answer_ending

    from .conftest import greedy

    subject = facts["facts"][0]["en"]["subject"]
    groups = [fact_group(facts, 0, 1), EditGroup({"en": LanguageEdit(f"The capital of {subject}", subject, "x")}),
              fact_group(facts, 7, 2, ("zh",))]  # prompts of 4 lengths; the second answers "is ..." (no ending)
    one_by_one = [{lang: answer_ending(greedy(trained_model, tokenizer, edit.prompt, 8)) for lang, edit in g.edits.items()}
                  for g in groups]
    calls = []
    generate = trained_model.generate
    monkeypatch.setattr(trained_model, "generate", lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw))
    assert answer_boundaries_many(trained_model, tokenizer, groups) == one_by_one
    assert one_by_one == [{"en": ".", "zh": "。"}, {"en": ""}, {"zh": "。"}]
    assert len(calls) == 1 and calls[0][0] == 4


def lafn_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each host read of a tensor (float(), .item(), .tolist(), bool()) made by lafn_hf's own code."""
    reads: list[str] = []

    def recording(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}lafn_hf{os.sep}" in caller:
                reads.append(f"{name} in {os.path.basename(caller)}")
            return original(self, *args)
        return read

    for name in ("__float__", "item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    return reads


def test_an_optimisation_step_reads_one_value_back_from_the_device(
        trained_model: Any, tokenizer: Any, facts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU runs ahead of Python only until the next host read: each waits for every queued kernel. Each step
    reads the losses once (early stopping); before, it read each loss, for the clamp each layer's norm of each
    group, and whether any target trains a word's end (5 reads a step here at B=1)."""
    import lafn_hf.editing.optimize
    import lafn_hf.editing.optimize_many
    from lafn_hf.editing.optimize import optimize_update
    from lafn_hf.editing.optimize_many import optimize_updates

    def no_punctuation(model: Any, tokenizer: Any, groups: Any, new_tokens: int = 8) -> list[dict[str, str]]:
        return [{lang: "" for lang in group.edits} for group in groups]  # so English targets train WORD_END

    for module in (lafn_hf.editing.optimize, lafn_hf.editing.optimize_many):
        monkeypatch.setattr(module, "answer_boundaries_many", no_punctuation)
    neurons = {1: torch.arange(32), 2: torch.arange(16, 48)}
    reads = lafn_reads(monkeypatch)
    for batch_size in (1, 3):
        counts = []
        for steps in (4, 12):
            del reads[:]
            config = LafnConfig(steps=steps, early_stop_loss=0.0, min_target_probability=0.0)
            groups = [fact_group(facts, g, g + 10) for g in range(batch_size)]
            if batch_size == 1:
                optimize_update(trained_model, tokenizer, groups[0], neurons, config)
            else:
                optimize_updates(trained_model, tokenizer, groups, [neurons] * batch_size, config)
            counts.append(len(reads))
        assert (counts[1] - counts[0]) / 8 == 1, (batch_size, counts, reads)
