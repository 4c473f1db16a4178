"""edit_many(batch_size=B): B groups optimised in one forward per step equal one-at-a-time edits."""

from __future__ import annotations

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


def test_batched_edits_equal_one_at_a_time(tokenizer: Any, facts: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    from .conftest import TINY_DIR

    groups = [fact_group(facts, source, source + 20) for source in range(5)]
    config = LafnConfig(steps=12, early_stop_loss=2.0, min_target_probability=0.0)  # groups stop at steps 4-12
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR).eval()
    single, single_bank = banks_of(model, tokenizer, groups, config, 1)
    packed, packed_bank = banks_of(model, tokenizer, groups, config, 4)  # a batch of 4, then one of 1
    assert not single.failures and not packed.failures
    assert len({result.steps for result in single.results}) > 1  # the batch was packed again as groups stopped
    for a, b in zip(single.results, packed.results):
        assert a.steps == b.steps and a.shared_counts == b.shared_counts
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
