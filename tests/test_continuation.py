"""``LafnConfig.continuation_kl``: what follows an edited answer is held to what the unedited model reads after it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lafn_hf import LafnConfig
from lafn_hf.editing.optimize import (
    _BaseRun,
    answer_continuations_many,
    build_batch,
    optimize_update,
    selected_logits,
)
from lafn_hf.editing.optimize_many import optimize_updates
from lafn_hf.values import LayerPlan, ValueInjection, hit_tensor

from .conftest import fact_group, random_model

CPU = torch.device("cpu")
NEURONS = {1: torch.arange(0, 64, 2), 2: torch.arange(1, 64, 2)}


def test_every_sequence_reads_the_answers_next_token_and_the_appended_continuation(
        tokenizer: Any, facts: dict[str, Any]) -> None:
    group = fact_group(facts, 0, 1)
    config = LafnConfig(num_prefixes=1, continuation_kl=3)
    prefixes = {"en": ["It is known."], "zh": ["众所周知。"]}
    following = {"en": [11, 12, 13, 14], "zh": [21]}  # more than continuation_kl - 1 tokens are cut to 2
    batch = build_batch(tokenizer, group, prefixes, config, CPU, None, None, following)
    plain = build_batch(tokenizer, group, prefixes, LafnConfig(num_prefixes=1), CPU)
    assert batch.continuation is not None and plain.continuation is None
    assert torch.equal(batch.kl_rows[~batch.continuation], plain.kl_rows)  # "{subject} is a" first, as before
    held_rows = batch.kl_rows[batch.continuation]
    assert set(held_rows.tolist()) == set(range(len(batch.sequence_language)))  # every sequence, prefixed or not
    for row, lang in enumerate(batch.sequence_language):
        answer_end = int(plain.attention_mask[row].sum()) - 1  # the last token of the answer
        appended = following[lang][:2]
        assert batch.input_ids[row, answer_end + 1 : answer_end + 1 + len(appended)].tolist() == appended
        assert batch.kl_positions[batch.continuation][held_rows == row].tolist() == list(
            range(answer_end, answer_end + len(appended) + 1))
    assert torch.equal(batch.target_ids, plain.target_ids)  # the continuation is held, not trained as target


def test_continuation_kl_of_one_appends_nothing(tokenizer: Any, facts: dict[str, Any]) -> None:
    group = fact_group(facts, 0, 1)
    batch = build_batch(tokenizer, group, {}, LafnConfig(num_prefixes=0, continuation_kl=1), CPU)
    plain = build_batch(tokenizer, group, {}, LafnConfig(num_prefixes=0), CPU)
    assert torch.equal(batch.input_ids, plain.input_ids)
    assert batch.continuation is not None and int(batch.continuation.sum()) == len(batch.sequence_language)


def test_continuations_are_the_unedited_models_greedy_tokens(tokenizer: Any, facts: dict[str, Any]) -> None:
    model = random_model("llama", len(tokenizer))
    group = fact_group(facts, 0, 1)
    found = answer_continuations_many(model, tokenizer, [group, group], [None, {"en": "."}], 3)
    assert found[0].keys() == {"en", "zh"} and found[0] == {**found[1], "en": found[0]["en"]}
    edit = group.edits["zh"]
    encoded = tokenizer(edit.prompt + edit.target, return_tensors="pt")
    expected = model.generate(**encoded, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    stops = {tokenizer.eos_token_id}
    tokens = expected[0, encoded["input_ids"].shape[1]:].tolist()
    assert found[0]["zh"] == next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


def test_an_answer_the_unedited_model_ends_has_no_continuation(trained_model: Any, tokenizer: Any,
                                                               facts: dict[str, Any]) -> None:
    """The toy ends "... is Lunno." with EOS: nothing follows, so nothing past it is held (a forced minimum of new
    tokens had suppressed that EOS and held three tokens the unedited model never writes)."""
    group = fact_group(facts, 0, 1)
    assert answer_continuations_many(trained_model, tokenizer, [group], [{"en": ".", "zh": "。"}], 3) == [
        {"en": [], "zh": []}]


def _kl_after_the_answer(model: Any, tokenizer: Any, group: Any, deltas: dict[int, torch.Tensor]) -> float:
    """Mean KL(unedited || edited) over each answer's next token and two tokens of its continuation."""
    config = LafnConfig(num_prefixes=0, continuation_kl=3)
    following = answer_continuations_many(model, tokenizer, [group], [None], 2)[0]
    batch = build_batch(tokenizer, group, {}, config, CPU, None, None, following)
    base = _BaseRun(model, batch, (1, 2))
    with torch.no_grad(), ValueInjection(model, (1, 2)) as injection:
        injection.plan = {layer: LayerPlan.build(hit_tensor(batch.subject_hits, CPU), NEURONS[layer], deltas[layer])
                          for layer in (1, 2)}
        edited = torch.log_softmax(selected_logits(model, batch.input_ids, batch.attention_mask, batch.kl_rows,
                                                   batch.kl_positions), dim=-1)
    kl = (base.kl_log_probs.exp() * (base.kl_log_probs - edited)).sum(-1)
    assert batch.continuation is not None
    return float(kl[batch.continuation].mean())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_held_continuation_stays_nearer_the_unedited_model(kind: str, tokenizer: Any, facts: dict[str, Any]) -> None:
    """Without the term nothing holds what follows the answer (random models: KL after the answer 0.038 llama /
    0.059 qwen2 after 30 steps); with three positions held it is 0.019 / 0.036."""
    group = fact_group(facts, 0, 1)
    kl = {}
    for held in (0, 3):
        model = random_model(kind, len(tokenizer))
        config = LafnConfig(layers=(1, 2), num_prefixes=0, steps=30, early_stop_loss=0.0, continuation_kl=held)
        kl[held] = _kl_after_the_answer(model, tokenizer, group, optimize_update(model, tokenizer, group, NEURONS,
                                                                                 config).deltas)
    assert kl[3] < 0.75 * kl[0], kl


def test_batched_edits_hold_the_continuation_as_alone(tokenizer: Any, facts: dict[str, Any]) -> None:
    model = random_model("llama", len(tokenizer))
    groups = [fact_group(facts, 0, 1), fact_group(facts, 2, 3)]
    config = LafnConfig(layers=(1, 2), num_prefixes=0, steps=5, early_stop_loss=0.0, continuation_kl=3)
    together = optimize_updates(model, tokenizer, groups, [NEURONS, NEURONS], config)
    for group, result in zip(groups, together):
        alone = optimize_update(model, tokenizer, group, NEURONS, config)
        assert not isinstance(result, Exception)
        for layer in NEURONS:
            torch.testing.assert_close(result.deltas[layer], alone.deltas[layer], rtol=1e-4, atol=1e-5)


def test_continuation_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="continuation_kl must be >= 0, got -1"):
        LafnConfig(continuation_kl=-1)
    with pytest.raises(TypeError, match="continuation_kl must be an int"):
        LafnConfig(continuation_kl=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lambda_continuation must be >= 0"):
        LafnConfig(lambda_continuation=-1.0)
