"""Fuzzing the bank format (issue 37): 1,200 banks saved by lafn-hf and then damaged at random (truncated, bytes
flipped, tensors reshaped, recast, given other values or offsets, config fields changed). Each case may only be
refused with a ValueError at load, or load and give finite logits on a prompt naming a subject and on an
unrelated one, within a time limit; no other exception, no hang."""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lafn_hf import EditableCausalLM, EditBank
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME
from lafn_hf.bank.store import save_bank

from .conftest import TINY_DIR, make_entry, weights_file
from .crafting import (
    SUBJECT_PROMPT,
    UNRELATED_PROMPT,
    narrowed,
    rewrite_config,
    rewrite_weights,
    routed_entry,
    sign_weights,
    within,
)

CASES = 1200
SECONDS_PER_CASE = 5.0  # a case takes about 20 ms; the limit catches hangs, not slowness on a busy machine
SPECIAL_FLOATS = [float("nan"), float("inf"), -1.0, 0.0, -0.0, 1e6, 3.4e38, 65504.0, 7.0, 1e-45]
SPECIAL_INTS = [-1, 0, 1, 7, 63, 64, 256, 2**31 - 1, 2**31, -(2**40)]
SPECIAL_JSON: list[Any] = [None, True, 0, -1, 2**70, 1.5, "", " ", "the", "a", "的", "x" * 300, [], {}, [1, "a"],
                          {"en": "the"}, {"en": 3}, "lafn_bank-0000000000000000.safetensors", "0" * 64]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64, torch.bool]


def base_bank() -> EditBank:
    """Three entries: two with a routing key and a question scope (one with an alias), one on two layers."""
    return EditBank([routed_entry(64, "e0", "Marbrafi", seed=0, aliases=("Marbrafi City",)),
                     routed_entry(64, "e1", "Lunvalfiland", seed=1, edit_layer=2, neurons=8),
                     make_entry({"en": "Eiffelturm", "de": "Eiffel-Turm"}, layers=(1, 3), size=256, seed=2)])


# -- damage ---------------------------------------------------------------------------------------
def damage_bytes(directory: Path, rng: random.Random) -> str:
    """Truncate the weights file or flip bytes in it, re-signed (sha256 and name) or not."""
    path = weights_file(directory)
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5:
        kind, data = "truncated", data[: rng.randrange(len(data))]
    else:
        kind = "bytes flipped"
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.5:
        path.write_bytes(bytes(data))
        return f"{kind}, sha256 stale"
    sign_weights(directory, bytes(data))
    return f"{kind}, re-signed"


def damage_tensor(rng: random.Random) -> tuple[str, Callable[[dict[str, torch.Tensor]], None]]:
    """A change to one stored tensor (or all routing or scope tensors together), re-signed as a buggy writer would."""
    kind = rng.choice(["shape", "dtype", "value", "offset", "narrow group", "drop or add"])

    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        name = rng.choice(sorted(tensors))
        tensor = tensors[name]
        if kind == "shape":
            options: list[Callable[[torch.Tensor], torch.Tensor]] = [
                lambda t: t[: rng.randrange(max(1, t.shape[0]))] if t.dim() else t, lambda t: t.unsqueeze(0),
                lambda t: t.flatten(), lambda t: t.t() if t.dim() == 2 else t.repeat(2),
                lambda t: t[:, : rng.randrange(max(1, t.shape[1]))] if t.dim() == 2 else t[:0]]
            tensors[name] = rng.choice(options)(tensor).contiguous()
        elif kind == "dtype":
            tensors[name] = tensor.to(rng.choice(DTYPES))
        elif kind == "value" and tensor.numel():
            flat = tensor.flatten().clone()
            index = rng.randrange(flat.numel())
            if tensor.is_floating_point():
                flat[index] = rng.choice(SPECIAL_FLOATS)
            elif tensor.dtype == torch.bool:
                flat[index] = ~flat[index]
            else:
                limits = torch.iinfo(tensor.dtype)
                flat[index] = min(max(rng.choice(SPECIAL_INTS), limits.min), limits.max)
            tensors[name] = flat.reshape(tensor.shape)
        elif kind == "offset":
            name = rng.choice([n for n in tensors if n.endswith("offsets")] or [name])
            flat = tensors[name].flatten().clone()
            if flat.numel() and not flat.is_floating_point():
                flat[rng.randrange(flat.numel())] += rng.choice([-2, -1, 1, 2, 1000])
            tensors[name] = flat
        elif kind == "narrow group":
            group = rng.choice([("key_vectors", "space_means", "space_scales"),
                                ("scope_vectors", "scope_space_means", "scope_space_scales", "scope_templates",
                                 "scope_bases")])
            narrowed(group, rng.choice([1, 32, 63]))(tensors)
        elif rng.random() < 0.5:
            del tensors[name]
        else:
            tensors[rng.choice(["extra", "e0/1/delta", "key_entries2"])] = torch.ones(3)
    return f"tensor {kind}", mutate


def damage_config(rng: random.Random) -> tuple[str, Callable[[dict[str, Any]], None]]:
    """A change to one field of lafn_config.json: a new value, deleted, or an unknown field added."""
    def mutate(config: dict[str, Any]) -> None:
        parent, key = random_field(config, rng)
        action = rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif action < 0.25 and isinstance(parent, dict):
            parent["unknown_field"] = rng.choice(SPECIAL_JSON)
        else:
            parent[key] = rng.choice(SPECIAL_JSON)
    return "config field", mutate


def random_field(node: Any, rng: random.Random) -> tuple[Any, Any]:
    """A (container, key) pair somewhere in ``node``, deeper with some probability."""
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = rng.choice(keys)
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.7:
            node = child
            continue
        return node, key


def damage_config_text(directory: Path, rng: random.Random) -> str:
    path = directory / BANK_CONFIG_NAME
    text = path.read_text(encoding="utf-8")
    choice = rng.randrange(3)
    if choice == 0:
        text = text[: rng.randrange(len(text))]
    elif choice == 1:
        text = text.replace('"x"', rng.choice(["NaN", "Infinity", "-Infinity", "1e999", '"\\ud800"']), 1)
    else:
        cut = rng.randrange(len(text))
        text = text[:cut] + rng.choice(["{", "]", "\\", "\0", "\u200b", '"']) + text[cut:]
    path.write_text(text, encoding="utf-8")
    return "config text"


def damage(directory: Path, rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.2:
        return damage_bytes(directory, rng)
    if roll < 0.6:
        kind, mutate = damage_tensor(rng)
        rewrite_weights(directory, mutate)
        return kind
    if roll < 0.9:
        kind, change = damage_config(rng)
        rewrite_config(directory, change)
        return kind
    return damage_config_text(directory, rng)


# -- the test -------------------------------------------------------------------------------------
def outcome(editable: EditableCausalLM, directory: Path) -> str:
    """"refused" (a ValueError at load) or "loaded, finite"; anything else fails the test."""
    try:
        editable.load_bank(directory)
    except ValueError:
        return "refused"
    for prompt in (SUBJECT_PROMPT, UNRELATED_PROMPT):
        ids = editable.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = editable(ids).logits
        assert bool(torch.isfinite(logits).all()), f"non-finite logits on {prompt!r}"
    return "loaded, finite"


@pytest.mark.slow  # about 30 s on a busy 2-core machine
def test_damaged_banks_are_refused_or_load_and_answer(tokenizer: Any, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    models = [EditableCausalLM(AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=dtype).eval(), tokenizer)
              for dtype in (torch.float32, torch.float16)]
    pristine = tmp_path / "pristine"
    save_bank(pristine, base_bank(), models[0].base_ref)
    rng = random.Random(37)
    counts: Counter[tuple[str, str]] = Counter()
    slowest = 0.0
    for case in range(CASES):
        directory = tmp_path / f"case{case}"
        directory.mkdir()
        for path in pristine.iterdir():
            (directory / path.name).write_bytes(path.read_bytes())
        kind = damage(directory, rng)
        editable = models[case % 2]
        editable.set_bank(EditBank())
        started = time.perf_counter()
        try:
            result = within(SECONDS_PER_CASE, functools.partial(outcome, editable, directory))
        except Exception as error:
            raise AssertionError(f"case {case} ({kind}): {type(error).__name__}: {error}") from error
        slowest = max(slowest, time.perf_counter() - started)
        counts[kind.split(",")[0], result] += 1
    with capsys.disabled():
        print(f"\n{CASES} damaged banks (slowest case {slowest:.2f} s):")
        for (kind, result), count in sorted(counts.items()):
            print(f"  {kind:16s} {result:15s} {count}")
    assert sum(counts.values()) == CASES >= 1000
    assert sum(n for (_, result), n in counts.items() if result == "loaded, finite") >= 50  # not all refused
