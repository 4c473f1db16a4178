"""Real programs: threads sharing one model, edits while others generate, chats through a reused KV cache."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from lafn_hf import EditableCausalLM
from lafn_hf.routing.cache_rows import returned_cache

from .conftest import CACHE, fact_group, make_entry, random_model

SUBJECT = "Marbrafi"
LONG_SUBJECT = "Quixaro"  # five tokens of the toy tokenizer ("Marbrafi" is one)


def generate_ids(model: Any, tokenizer: Any, prompt: str, new_tokens: int = 4, **options: Any) -> list[int]:
    encoded = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                            **options)
    return output[0].tolist()


def forward_logits(model: Any, ids: list[int], cache: Any = None) -> tuple[torch.Tensor, Any]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=cache is not None, **{CACHE: cache})
    return out.logits[0], returned_cache(out)


def test_four_threads_generating_see_exactly_their_own_edits(trained_model: Any, tokenizer: Any,
                                                            facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    subject = facts["facts"][0]["en"]["subject"]
    editable.add_entry(make_entry({"en": subject}, layers=(0, 1), size=256, scale=8.0))
    prompts = [f"The capital of {subject} is", f"The capital of {facts['facts'][1]['en']['subject']} is",
               f"{subject}的首都是", "The capital of"]
    expected = [generate_ids(editable, tokenizer, p) for p in prompts]
    with editable.edits_disabled():
        assert generate_ids(editable, tokenizer, prompts[0]) != expected[0]  # the edit changes the matched answer

    def worker(seed: int) -> list[tuple[int, list[int]]]:
        order = torch.randint(len(prompts), (250,), generator=torch.Generator().manual_seed(seed)).tolist()
        return [(i, generate_ids(editable, tokenizer, prompts[i])) for i in order]

    with ThreadPoolExecutor(4) as pool:
        results = [pair for batch in pool.map(worker, range(4)) for pair in batch]
    wrong = [i for i, ids in results if ids != expected[i]]
    assert len(results) == 1000 and wrong == []


def test_edit_while_other_threads_generate(trained_model: Any, tokenizer: Any, facts: dict[str, Any]) -> None:
    editable = EditableCausalLM(trained_model, tokenizer)
    kept = facts["facts"][2]["en"]["subject"]
    editable.add_entry(make_entry({"en": kept}, layers=(0, 1), size=256, scale=8.0))
    prompts = [f"The capital of {kept} is", f"The capital of {facts['facts'][3]['en']['subject']} is"]
    expected = [generate_ids(editable, tokenizer, p) for p in prompts]
    alone = editable.edit(fact_group(facts, 5, 6))
    editable.remove_edit(alone.entry_id)
    stop = threading.Event()
    outputs: list[tuple[int, list[int]]] = []
    errors: list[BaseException] = []

    def generate_until_stopped(offset: int) -> None:
        step = 0
        try:
            while not stop.is_set() or step < 5:
                index = (step + offset) % len(prompts)
                outputs.append((index, generate_ids(editable, tokenizer, prompts[index])))
                step += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=generate_until_stopped, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    try:
        concurrent = editable.edit(fact_group(facts, 5, 6))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(outputs) >= 10 and [i for i, ids in outputs if ids != expected[i]] == []
    entry, reference = editable.bank.get(concurrent.entry_id), alone
    assert concurrent.shared_counts == reference.shared_counts and concurrent.steps == reference.steps
    assert abs(concurrent.target_probabilities["en"] - reference.target_probabilities["en"]) < 1e-5
    assert set(entry.updates) == set(reference.layers)


def test_a_later_chat_turn_through_the_cache_is_edited_like_a_full_forward(tokenizer: Any) -> None:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 1, 2), scale=10.0))
    first = tokenizer("Hello there.")["input_ids"]
    second = tokenizer(f" Tell me about {SUBJECT} and more", add_special_tokens=False)["input_ids"]
    full, _ = forward_logits(editable, first + second)
    _, cache = forward_logits(editable, first, DynamicCache())
    turn, _ = forward_logits(editable, second, cache)
    torch.testing.assert_close(turn, full[len(first):], rtol=1e-4, atol=1e-5)
    with editable.edits_disabled():
        plain, _ = forward_logits(editable, first + second)
    assert not torch.allclose(plain[len(first):], full[len(first):], atol=1e-3)  # the subject really is edited


def test_token_by_token_decoding_matches_full_forwards_for_subjects_read_later(tokenizer: Any) -> None:
    editable = EditableCausalLM(random_model("qwen2", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 2), scale=10.0))
    ids = tokenizer(f"So {SUBJECT} was {SUBJECT}, x or {SUBJECT}.")["input_ids"]
    full, _ = forward_logits(editable, ids)
    step_logits, cache = forward_logits(editable, ids[:2], DynamicCache())
    rows = [step_logits]
    for token in ids[2:]:
        logits, cache = forward_logits(editable, [token], cache)
        rows.append(logits)
    torch.testing.assert_close(torch.cat(rows), full, rtol=1e-4, atol=1e-5)


def test_a_subject_whose_word_goes_on_fires_only_where_the_next_token_was_not_read_yet(tokenizer: Any) -> None:
    """Read in one forward, "{SUBJECT}x" is one word: no edit (bit-exact); decoded token by token, the
    subject's token fires before "x" arrives (the causal rule's one difference between the two)."""
    editable = EditableCausalLM(random_model("qwen2", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 2), scale=10.0))
    ids = tokenizer(f"So {SUBJECT}x was")["input_ids"]
    full, _ = forward_logits(editable, ids)
    with editable.edits_disabled():
        plain, _ = forward_logits(editable, ids)
    assert torch.equal(full, plain)
    cache, rows = DynamicCache(), []
    for token in ids:
        logits, cache = forward_logits(editable, [token], cache)
        rows.append(logits)
    assert not torch.allclose(torch.cat(rows), plain, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(CACHE == "past_key_values",
                    reason="this transformers (before 5.21-5.24) names the cache past_key_values=: the tests above")
def test_the_deprecated_past_key_values_keyword_carries_the_reading_like_cache(tokenizer: Any) -> None:
    """transformers 5.2x names the cache ``cache=`` (the tests above); ``past_key_values=``, its deprecated alias
    until 5.40 (a FutureWarning) and the name callers written for 5.0 use, carries each row's reading too."""
    editable = EditableCausalLM(random_model("qwen2", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": LONG_SUBJECT}, layers=(0, 2), scale=10.0))
    ids = tokenizer(f"So {LONG_SUBJECT} was {LONG_SUBJECT}.")["input_ids"]
    full, _ = forward_logits(editable, ids)
    cache, rows = DynamicCache(), []
    with torch.no_grad(), pytest.warns(FutureWarning, match="past_key_values"):
        for token in ids:
            rows.append(editable(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0])
    torch.testing.assert_close(torch.cat(rows), full, rtol=1e-4, atol=1e-5)


class ForceTokens(LogitsProcessor):
    """Makes greedy decoding emit ``tokens`` one per step, leaving the scores' other entries as they are."""

    def __init__(self, tokens: list[int], start: int) -> None:
        self.tokens, self.start = tokens, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.start
        if step >= len(self.tokens):  # assisted decoding scores one position past the last draft token
            return scores
        forced = scores.clone()
        forced[:, self.tokens[step]] = scores.max() + 100.0
        return forced


def test_a_subject_the_model_generates_is_edited_in_generate_like_in_a_full_forward(tokenizer: Any) -> None:
    """The prompt holds half the subject; generate() emits the rest token by token through its KV cache."""
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": LONG_SUBJECT}, layers=(0, 1, 2), scale=10.0))
    ids = tokenizer(f"It was {LONG_SUBJECT} who said that")["input_ids"]
    subject_end = len(tokenizer(f"It was {LONG_SUBJECT}")["input_ids"])
    prompt, rest = ids[: subject_end - 1], ids[subject_end - 1:]
    out = editable.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(rest), do_sample=False,
                            pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True,
                            logits_processor=LogitsProcessorList([ForceTokens(rest, len(prompt))]))
    assert out.sequences[0].tolist() == ids
    full, _ = forward_logits(editable, ids)
    torch.testing.assert_close(torch.cat(out.logits), full[len(prompt) - 1:-1], rtol=1e-4, atol=1e-5)
    with editable.edits_disabled():
        plain, _ = forward_logits(editable, ids)
    assert not torch.allclose(plain[subject_end:], full[subject_end:], atol=1e-3)  # the subject really is edited


def test_assisted_decoding_is_edited_like_a_full_forward_when_a_draft_is_rejected_inside_the_subject(
        tokenizer: Any) -> None:
    """Prompt lookup drafts "Qu|i|x|o|t" from the prompt's "Quixote"; "Qu|i|x" is kept, "o|t" cropped away, and
    the subject "Quixaro" completes in a later forward: the reading must survive the crop."""
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": LONG_SUBJECT}, layers=(0, 1, 2), scale=10.0))
    prompt = tokenizer("It was Quixote who said that, then Qu")["input_ids"]
    ids = tokenizer(f"It was Quixote who said that, then {LONG_SUBJECT} who sang it.")["input_ids"]
    assert ids[: len(prompt)] == prompt
    rest = ids[len(prompt):]
    read: list[int] = []  # tokens each forward reads
    hook = editable.model.register_forward_pre_hook(
        lambda _, args, kwargs: read.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]),
        with_kwargs=True)
    try:
        out = editable.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(rest), do_sample=False,
                                prompt_lookup_num_tokens=4, pad_token_id=0, output_logits=True,
                                eos_token_id=tokenizer.eos_token_id,  # never forced (5.0's prompt lookup fails on None)
                                return_dict_in_generate=True,
                                logits_processor=LogitsProcessorList([ForceTokens(rest, len(prompt))]))
    finally:
        hook.remove()
    assert out.sequences[0].tolist() == ids
    assert len(read) < len(rest)  # drafts were read several at a time
    full, _ = forward_logits(editable, ids)
    torch.testing.assert_close(torch.cat(out.logits), full[len(prompt) - 1:-1], rtol=1e-4, atol=1e-5)
    with editable.edits_disabled():
        plain, _ = forward_logits(editable, ids)
    assert not torch.allclose(plain[-5:], full[-5:], atol=1e-3)  # the subject really is edited


def test_generation_with_and_without_the_cache_agree(tokenizer: Any) -> None:
    """(A prompt ending in the subject is left out: without a cache, each step reads the whole text in one
    forward, so a generated letter that continues the subject's word turns its edit off there.)"""
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 1, 2), scale=10.0))
    for prompt in (f"The capital of {SUBJECT} is", f"{SUBJECT} was", "Nothing here"):
        cached = generate_ids(editable, tokenizer, prompt, new_tokens=8)
        assert cached == generate_ids(editable, tokenizer, prompt, new_tokens=8, use_cache=False)
        beams = generate_ids(editable, tokenizer, prompt, new_tokens=6, num_beams=3)
        assert beams == generate_ids(editable, tokenizer, prompt, new_tokens=6, num_beams=3, use_cache=False)


def test_beam_reordering_moves_each_rows_reading_with_it(tokenizer: Any) -> None:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)
    editable.add_entry(make_entry({"en": SUBJECT}, layers=(0, 1, 2), scale=10.0))
    rows = [tokenizer("It was x")["input_ids"], tokenizer("It was  ")["input_ids"]]  # word char vs space before
    assert len(rows[0]) == len(rows[1])
    subject_ids = tokenizer(SUBJECT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        cache = returned_cache(editable(input_ids=torch.tensor(rows), use_cache=True))
        cache.reorder_cache(torch.tensor([1, 0]))
        stepped = editable(input_ids=torch.tensor([subject_ids, subject_ids]), **{CACHE: cache}).logits
    for row, source in enumerate((1, 0)):
        full, _ = forward_logits(editable, rows[source] + subject_ids)
        torch.testing.assert_close(stepped[row], full[len(rows[source]):], rtol=1e-4, atol=1e-5)


def test_threads_adding_and_removing_entries_keep_the_bank_and_its_snapshots_whole(tokenizer: Any) -> None:
    editable = EditableCausalLM(random_model("llama", len(tokenizer)), tokenizer)

    def add_then_remove_half(worker: int) -> None:
        ids = [editable.add_entry(make_entry({"en": f"Name{worker}x{i}"}, seed=i)) for i in range(50)]
        for entry_id in ids[::2]:
            editable.remove_edit(entry_id)
            editable(input_ids=torch.tensor([[1, 5, 6]]))  # compile snapshots while others change the bank

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(add_then_remove_half, range(4)))
    assert len(editable.bank) == 100 and editable.bank.version == 300
    compiled = editable._injector.compiled(torch.device("cpu"))
    assert compiled.version[1] == 300 and len(compiled.entries_of) == 100


def test_concurrent_edits_leave_the_model_as_it_was(trained_model: Any, tokenizer: Any) -> None:
    from lafn_hf import LafnConfig
    from lafn_hf.modeling import decoder_layers
    from lafn_hf.models import tiny_fact_group

    editable = EditableCausalLM(trained_model, tokenizer)
    keys = set(trained_model.state_dict())
    config = LafnConfig(layers=(2, 3), min_target_probability=0.0)  # the upper-layer shortcut wraps layers 0-1
    threads = [threading.Thread(target=editable.edit, args=(tiny_fact_group(i, i + 1, ("en",)), config))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(editable.bank) == 3
    assert [type(layer).__name__ for layer in decoder_layers(trained_model)] == ["LlamaDecoderLayer"] * 4
    assert set(trained_model.state_dict()) == keys
