from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import pipeline

from lafn_hf import EditableCausalLM
from lafn_hf.tokens import encode_texts

from .conftest import make_entry, random_model

SUBJECT = "Marbrafi"
WITH = f"The capital of {SUBJECT} is"
WITHOUT = "The capital city of nowhere is"


def logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_empty_bank_is_bitwise_identical_and_hooks_are_owned(random_base: Any, tokenizer: Any) -> None:
    ids, mask = encode_texts(tokenizer, [WITH, WITHOUT])
    plain = logits(random_base, ids, mask)
    editable = EditableCausalLM(random_base, tokenizer)
    assert torch.equal(logits(editable, ids, mask), plain)
    owned = len(editable.hook_handles())
    assert owned == 2  # value hooks exist only on the layers of a non-empty bank
    editable.add_entry(make_entry({"en": SUBJECT}))
    assert not torch.equal(logits(editable, ids, mask), plain)
    with editable.edits_disabled():
        assert torch.equal(logits(editable, ids, mask), plain)
    with pytest.raises(RuntimeError, match="boom"), editable.edits_disabled():
        raise RuntimeError("boom")
    assert not torch.equal(logits(editable, ids, mask), plain)
    editable.unwrap()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in random_base.modules())


def test_a_model_takes_one_editable_wrapper_at_a_time(random_base: Any, tokenizer: Any) -> None:
    first = EditableCausalLM(random_base, tokenizer)
    first.add_entry(make_entry({"en": SUBJECT}))
    with pytest.raises(ValueError, match="already carries the edit hooks of another EditableCausalLM"):
        EditableCausalLM(random_base, tokenizer)
    assert len(first.hook_handles()) == 2  # the failed wrapper left nothing
    ids, mask = encode_texts(tokenizer, [WITH])
    edited = logits(first, ids, mask)
    second = EditableCausalLM(first.unwrap(), tokenizer)
    assert not torch.equal(logits(second, ids, mask), edited)  # the first bank no longer applies
    second.unwrap()


def test_a_forward_keeps_its_plan_while_another_thread_changes_the_bank(random_base: Any, tokenizer: Any) -> None:
    import threading

    editable = EditableCausalLM(random_base, tokenizer)
    entry_id = editable.add_entry(make_entry({"en": SUBJECT}, layers=(2,), scale=10.0))
    ids, mask = encode_texts(tokenizer, [WITH])
    edited = logits(editable, ids, mask)

    failures: list[BaseException] = []

    def meanwhile(module: Any, args: Any) -> None:  # runs inside the forward, before layer 2
        if entry_id not in editable.bank:  # the worker's own forward passes here too: change the bank once
            return

        def change_the_bank() -> None:
            try:
                editable.remove_edit(entry_id)
                editable(**tokenizer([WITHOUT], return_tensors="pt"))  # compiles the new, empty bank
            except BaseException as error:  # noqa: BLE001 - reported by the assert below
                failures.append(error)

        worker = threading.Thread(target=change_the_bank)
        worker.start()
        worker.join()

    handle = random_base.model.layers[0].register_forward_pre_hook(meanwhile)
    try:
        during = logits(editable, ids, mask)
    finally:
        handle.remove()
    assert failures == [] and entry_id not in editable.bank
    assert torch.equal(during, edited)  # planned with the entry: its dV still reaches layer 2
    assert not torch.equal(logits(editable, ids, mask), edited)  # the next forward sees the new bank


def test_value_hooks_live_only_on_the_bank_layers(random_base: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(random_base, tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 2)))

    def value_hooks() -> list[int]:
        return [len(layer.mlp.down_proj._forward_pre_hooks) for layer in random_base.model.layers]

    assert value_hooks() == [0, 0, 0]
    encoded = tokenizer([WITH], return_tensors="pt")
    editable.generate(**encoded, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert value_hooks() == [1, 0, 1]
    editable.remove_edit(next(iter(editable.bank)).id)
    editable(**tokenizer([WITHOUT], return_tensors="pt"))
    assert value_hooks() == [1, 0, 1]  # kept: a forward planned before the removal may still need them
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(1,)))
    editable(**tokenizer([WITHOUT], return_tensors="pt"))
    assert value_hooks() == [1, 1, 1]
    editable.unwrap()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in random_base.modules())


def test_foreign_hooks_survive(random_base: Any, tokenizer: Any) -> None:
    foreign = random_base.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: None)
    editable = EditableCausalLM(random_base, tokenizer)
    with editable.edits_disabled():
        pass
    editable.unwrap()
    assert list(random_base.model.layers[0].mlp.down_proj._forward_pre_hooks) == [foreign.id]


def test_one_entry_changes_only_from_the_subject_on(random_base: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(random_base, tokenizer)
    ids, mask = encode_texts(tokenizer, [WITH, WITHOUT])
    plain = logits(random_base, ids, mask)
    editable.add_entry(make_entry({"en": SUBJECT}))
    edited = logits(editable, ids, mask)
    subject_end = len(tokenizer(f"The capital of {SUBJECT}")["input_ids"]) - 1
    assert torch.equal(edited[0, :subject_end], plain[0, :subject_end])
    assert (edited[0, subject_end:] - plain[0, subject_end:]).abs().amax(-1).min() > 1e-4
    assert torch.equal(edited[1], plain[1])


def test_left_and_right_padding_give_the_same_rows(random_base: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(random_base, tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}))
    texts = [WITH, f"Tell me: {WITH}", WITHOUT]
    right_ids, right_mask = encode_texts(tokenizer, texts)
    left_ids, left_mask = encode_texts(tokenizer, texts, left=True)
    right, left = logits(editable, right_ids, right_mask), logits(editable, left_ids, left_mask)
    for row in range(len(texts)):
        n = int(right_mask[row].sum())
        single = logits(editable, right_ids[row : row + 1, :n])
        torch.testing.assert_close(right[row, :n], single[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(left[row, -n:], single[0], rtol=1e-4, atol=1e-5)


def test_cached_greedy_generation_equals_full_forwards(random_base: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(random_base, tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 1, 2), scale=10.0))
    encoded = tokenizer(WITH, return_tensors="pt")
    generated = editable.generate(**encoded, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    sequence = encoded["input_ids"]
    for _ in range(8):
        next_token = logits(editable, sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert SUBJECT not in tokenizer.decode(sequence[0, encoded["input_ids"].shape[1]:])
    assert torch.equal(generated, sequence)
    with editable.edits_disabled():
        plain = editable.generate(**encoded, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert not torch.equal(plain, generated)


def test_beam_search_and_sampling_run_with_a_bank(random_base: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(random_base, tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}))
    encoded = tokenizer([WITH, WITHOUT], return_tensors="pt", padding=True)
    beams = editable.generate(**encoded, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    sampled = editable.generate(**encoded, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert beams.shape[0] == sampled.shape[0] == 2


def test_pipeline_output_differs_with_the_bank(random_base: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(random_base, tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 1, 2), scale=6.0))
    generator = pipeline("text-generation", model=editable, tokenizer=tokenizer)
    options = dict(max_new_tokens=8, do_sample=False, return_full_text=False, pad_token_id=0)
    edited = generator(WITH, **options)[0]["generated_text"]
    with editable.edits_disabled():
        plain = generator(WITH, **options)[0]["generated_text"]
    assert edited != plain


def test_wrapper_passes_attributes_through(random_base: Any, tokenizer: Any) -> None:
    editable = EditableCausalLM(random_base, tokenizer).eval()
    assert editable.config is random_base.config
    assert editable.device == random_base.device
    assert editable.generation_config is random_base.generation_config
    assert editable.to(torch.float64).dtype == torch.float64


def test_unsupported_model_raises(tokenizer: Any) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match="model_type 'gpt2' is not supported"):
        EditableCausalLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), tokenizer)


def test_from_pretrained_loads_float32_on_a_cpu_machine(tokenizer: Any, tmp_path: Any) -> None:
    random_base_bf16 = random_model_bf16(len(tokenizer))
    random_base_bf16.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert EditableCausalLM.from_pretrained(tmp_path / "base").dtype == expected
    assert EditableCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).dtype == torch.bfloat16


def random_model_bf16(vocab_size: int) -> Any:
    from .conftest import random_model

    return random_model("llama", vocab_size).to(torch.bfloat16)


def test_incremental_bank_updates_equal_a_rebuild(tokenizer: Any) -> None:
    from lafn_hf.routing.compiled import CompiledBank
    from lafn_hf.routing.row_reader import RowReader, decoder_for

    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    names = [f"Name{i}x" for i in range(30)] + [SUBJECT, "Marb\u200brafi"]
    ids = [editable.add_entry(make_entry({"en": names[i % len(names)], "zh": f"名{i % 7}"}, layers=(i % 3,), seed=i))
           for i in range(60)]
    cpu = torch.device("cpu")
    editable._injector.compiled(cpu)
    texts = [f"{SUBJECT} and Name3x, 名5 or Marb\u200brafi; Name29x", "Name1 Name10x 名0名1 New3y"]
    tiers = []
    for step, entry_id in enumerate(ids[::3]):
        editable.remove_edit(entry_id)
        editable.add_entry(make_entry({"en": f"New{step}y", "zh": "名2"}, layers=(1, 2), seed=100 + step))
        incremental, rebuilt = editable._injector.compiled(cpu), CompiledBank.build(editable.bank, cpu)
        assert incremental.version == rebuilt.version and incremental.layers == rebuilt.layers
        assert incremental.entries_of == rebuilt.entries_of and incremental.updates.keys() == rebuilt.updates.keys()
        tiers.append(len(incremental.matcher._tiers))
        for text in texts:
            reader = RowReader(decoder_for(tokenizer), frozenset(tokenizer.all_special_ids))
            reader.read(tokenizer(text)["input_ids"])
            plans = [compiled.plan([reader], 0) for compiled in (incremental, rebuilt)]
            assert plans[0] is not None and plans[1] is not None and plans[0].keys() == plans[1].keys()
            for layer in plans[0]:
                assert all(torch.equal(getattr(plans[0][layer], f), getattr(plans[1][layer], f))
                           for f in ("rows", "positions", "neurons", "values"))
    assert max(tiers) == 4 and min(tiers[3:]) >= 2  # the matcher grew and merged its small automata, no rebuild
