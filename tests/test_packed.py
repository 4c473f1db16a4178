"""Packed forwards (continuous batching): each request of one flattened row is read and edited as a batch row of
``generate()`` is, with its own entries; a description that does not fit the forward leaves it unedited."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import torch
from transformers import DynamicCache

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.models import tiny_fact_group, tiny_facts, tiny_model_path
from lafn_hf.runtime.inject import entries_selected
from lafn_hf.runtime.packed import PackedSequence, RequestReaders, layout_problem, packed_batch

from .conftest import CACHE

FACTS = tiny_facts()["facts"]
TEMPLATE = tiny_facts()["templates"]["en"][0]  # "The capital of {s} is"
PROMPTS = [TEMPLATE.format(s=FACTS[i]["en"]["subject"]) for i in (0, 2, 5)]  # edited, edited, unrelated


@pytest.fixture(scope="module")
def edited() -> EditableCausalLM:
    """The tiny model with two real edits (fact 0 -> fact 1's capital, fact 2 -> fact 3's), keys and scopes on."""
    model = EditableCausalLM.from_pretrained(str(tiny_model_path()))
    for source, target in ((0, 1), (2, 3)):
        model.edit(tiny_fact_group(source, target, ("en",)), LafnConfig(num_prefixes=0), progress=False)
    return model


def entry_of(model: EditableCausalLM, fact: int) -> frozenset[str]:
    subject = FACTS[fact]["en"]["subject"]
    return frozenset(entry.id for entry in model.bank if subject in entry.subjects.values())


def packed_inputs(rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """One row of ``rows`` back to back: ids, positions from 0 per request, cu_seq_lens_q, block-causal mask."""
    lengths = torch.tensor([len(row) for row in rows])
    total = int(lengths.sum())
    owner = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    allowed = (owner[:, None] == owner[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    return {"input_ids": torch.tensor([[t for row in rows for t in row]]),
            "position_ids": torch.tensor([[p for row in rows for p in range(len(row))]]),
            "cu_seq_lens_q": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "attention_mask": torch.zeros(1, 1, total, total).masked_fill(~allowed, float("-inf"))}


def described(model: EditableCausalLM, rows: Sequence[Sequence[int]],
              selected: Sequence[frozenset[str] | None]) -> list[PackedSequence]:
    readers = RequestReaders(model.tokenizer)
    starts = [sum(len(row) for row in rows[:i]) for i in range(len(rows))]
    return [PackedSequence(readers.reader(i, 0), start, len(row), chosen)
            for i, (row, start, chosen) in enumerate(zip(rows, starts, selected))]


@torch.no_grad()
def single(model: EditableCausalLM, ids: Sequence[int], selected: frozenset[str] | None = None) -> torch.Tensor:
    with entries_selected(selected):
        return model(torch.tensor([list(ids)])).logits[0]


@torch.no_grad()
def test_each_packed_request_gets_its_own_entries(edited: EditableCausalLM) -> None:
    rows = [edited.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    only_b, nothing = entry_of(edited, 2), frozenset[str]()
    inputs = packed_inputs(rows)
    for selected in ([None, None, None], [only_b, only_b, None], [nothing, None, only_b]):
        with packed_batch(described(edited, rows, selected)):
            logits = edited(**inputs).logits[0]
        start = 0
        for row, chosen in zip(rows, selected):
            expected = single(edited, row, chosen)
            torch.testing.assert_close(logits[start : start + len(row)], expected, atol=2e-4, rtol=0)
            start += len(row)
    # the edits change the prompts they were made for, nothing else
    assert not torch.allclose(single(edited, rows[0])[-1], single(edited, rows[0], nothing)[-1], atol=1e-2)
    assert torch.allclose(single(edited, rows[2])[-1], single(edited, rows[2], nothing)[-1], atol=1e-5)


@torch.no_grad()
def test_a_request_read_over_two_forwards_fires_where_one_forward_does(edited: EditableCausalLM) -> None:
    """Chunked prefill: the subject is split between two forwards (its reader carries on in between)."""
    ids = edited.tokenizer(PROMPTS[0])["input_ids"]
    cut = len(ids) - 3  # inside "Marbrafi"
    readers = RequestReaders(edited.tokenizer)
    cache = DynamicCache(config=edited.model.config)
    for first, last in ((0, cut), (cut, len(ids))):
        chunk = ids[first:last]
        sequence = PackedSequence(readers.reader("r", first), 0, len(chunk))
        with packed_batch([sequence]):
            logits = edited(input_ids=torch.tensor([chunk]), position_ids=torch.arange(first, last)[None],
                            cu_seq_lens_q=torch.tensor([0, len(chunk)]), use_cache=True, **{CACHE: cache}).logits
    torch.testing.assert_close(logits[0, -1], single(edited, ids)[-1], atol=2e-4, rtol=0)
    assert readers.reader("r", len(ids)).text.endswith(FACTS[0]["en"]["subject"] + " is")


@torch.no_grad()
def test_a_description_that_does_not_fit_the_forward_leaves_it_unedited(
        edited: EditableCausalLM, caplog: pytest.LogCaptureFixture) -> None:
    rows = [edited.tokenizer(prompt)["input_ids"] for prompt in PROMPTS[:2]]
    inputs = packed_inputs(rows)
    with edited.edits_disabled():
        unedited = edited(**inputs).logits
    wrong = described(edited, rows, [None, None])
    wrong[1] = PackedSequence(wrong[1].reader, wrong[1].start + 1, wrong[1].length - 1)
    with caplog.at_level(logging.DEBUG, logger="lafn_hf.runtime.inject"):
        for sequences in (wrong, wrong[:1], None):
            if sequences is None:
                logits = edited(**inputs).logits
            else:
                with packed_batch(sequences):
                    logits = edited(**inputs).logits
            assert torch.equal(logits, unedited)
    reasons = [(record.levelname, record.getMessage().partition("without the edit bank: ")[2]) for record in caplog.records]
    assert reasons == [("WARNING", f"request 1 is described at tokens [{len(rows[0]) + 1}, {sum(map(len, rows))}) but "
                                   f"cu_seq_lens_q puts it at [{len(rows[0])}, {sum(map(len, rows))})"),
                       ("DEBUG", f"cu_seq_lens_q [0, {len(rows[0])}, {sum(map(len, rows))}] holds more requests than "
                                 "the 1 described"),
                       ("WARNING", "no lafn_hf.runtime.packed.packed_batch describes its requests")]
    late = PackedSequence(wrong[0].reader, 0, len(rows[0]))
    assert layout_problem([late], torch.tensor([0, len(rows[0])]), torch.tensor([[3]]), 99) == (
        "request 0 starts at position 3 but its reader has read 0")


def test_request_readers_keep_one_reader_per_request_and_rebuild_it(edited: EditableCausalLM) -> None:
    tokenizer = edited.tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    readers = RequestReaders(tokenizer)
    first = readers.reader(7, 0)
    first.read(ids)
    assert readers.reader(7, len(ids)) is first and len(readers) == 1
    rebuilt = readers.reader(7, 4, lambda: ids)  # the engine computed other positions: read again from its tokens
    assert rebuilt is not first and rebuilt.tokens == ids[:4]
    blind = readers.reader(8, 5)  # no tokens known: those positions read as nothing
    assert blind.tokens == [None] * 5 and blind.text == ""
    readers.drop(7)
    readers.drop(8)
    assert len(readers) == 0
