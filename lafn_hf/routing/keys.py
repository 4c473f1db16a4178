"""Representation keys, made at edit time (issue: routing beyond exact match).

An entry's key is the hidden state entering its first edited layer at the subject's last token, averaged
over the edit prompt and paraphrases of every language of the group (each language weighs the same),
since those states are what the paper finds shared across languages. States are compared in a key space
measured on the model itself: h -> unit vector of (h - mean) / scale, with mean and scale taken per
dimension over the tokens of a small built-in multilingual set of unrelated sentences
(``data/negatives.json``). Without the scaling a few large dimensions decide every cosine (measured on
Gemma-3-270M: unrelated MzsRE questions then came within 0.1 of most keys).

The threshold of a key is calibrated on the same negatives and on the subject's head standing alone in
each edit prompt (``head_states``: "massacre" for "Suryamani massacre"): the highest cosine any of their
tokens reaches with the key, plus ``RoutingConfig.threshold_margin``, and at least
``RoutingConfig.threshold_floor``; then
against the bank's other keys (``separate``): never below the highest cosine with another entry's key plus
the margin (and the other entry's threshold rises likewise), since other subjects are what a key is most
easily confused with (measured on MzsRE dev: without it another item's entry fired on 5-45% of questions).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from contextlib import suppress
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch import nn

from lafn_hf.modeling import decoder_layers

from ..bank.entries import BankEntry, EditBank, KeySpace, RoutingKey
from ..hooks import ForwardScope
from ..request import EditGroup
from ..text import is_spaceless_char
from ..tokens import pad_batch, pad_id
from .config import RoutingConfig
from .matcher import SubjectMatcher
from .row_reader import subject_token_positions


class _Enough(Exception):
    """Raised by the capturing hook: the layers above are not needed."""


@cache
def negative_sentences() -> tuple[str, ...]:
    """The built-in unrelated sentences (16 languages), in file order."""
    raw = json.loads(resources.files("lafn_hf.routing").joinpath("data/negatives.json").read_text("utf-8"))
    return tuple(text for lang, texts in raw.items() if not lang.startswith("_") for text in texts)


@torch.no_grad()
def layer_inputs(model: nn.Module, tokenizer: Any, texts: Sequence[str], layer: int,
                 batch_size: int = 16) -> list[tuple[list[int], torch.Tensor]]:
    """Per text: (its token ids, the (T, hidden) float32 CPU hidden states entering decoder layer ``layer``).

    Runs the model up to that layer only, with hooks acting on this thread's forwards alone; call it with
    the bank off (``EditableCausalLM.edits_disabled``) to read the base model's states.
    """
    modules = decoder_layers(model)
    if not 0 <= layer < len(modules):
        raise ValueError(f"layer {layer} is out of range for a model with {len(modules)} layers")
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        raise _Enough

    device = next(model.parameters()).device
    out: list[tuple[list[int], torch.Tensor]] = []
    with ForwardScope() as scope:
        scope.pre_hook(modules[layer], grab, with_kwargs=True)
        for start in range(0, len(texts), batch_size):
            rows = [list(tokenizer(text)["input_ids"]) for text in texts[start : start + batch_size]]
            input_ids, attention_mask = pad_batch(rows, pad_id(tokenizer), device)
            with suppress(_Enough):
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = captured.pop("hidden").float().cpu()
            out += [(row, hidden[i, : len(row)]) for i, row in enumerate(rows)]
    return out


def content_states(tokenizer: Any, states: Sequence[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """All states of non-special tokens, stacked (special tokens such as BOS carry no content)."""
    special = {int(i) for i in tokenizer.all_special_ids}
    kept = [hidden[[i for i, token in enumerate(ids) if token not in special]] for ids, hidden in states]
    return torch.cat(kept) if kept else torch.zeros(0)


def negative_states(model: nn.Module, tokenizer: Any, layer: int) -> torch.Tensor:
    """The built-in negatives' token states entering decoder layer ``layer``: (N, hidden) float32."""
    return content_states(tokenizer, layer_inputs(model, tokenizer, negative_sentences(), layer))


def calibrate_key_space(model: nn.Module, tokenizer: Any, layer: int) -> tuple[KeySpace, torch.Tensor]:
    """(the key space of ``layer``, the built-in negatives' token states projected into it: (N, hidden))."""
    hidden = negative_states(model, tokenizer, layer)
    space = key_space(layer, hidden)
    return space, space.project(hidden)


def key_space(layer: int, hidden: torch.Tensor) -> KeySpace:
    """The key space measured on ``hidden`` (N, hidden): per-dimension mean and spread."""
    mean = hidden.mean(dim=0)
    std = hidden.std(dim=0)
    scale = torch.maximum(std, std.mean() * 1e-3).clamp_min(1e-12)  # a dead dimension must not divide by ~0
    return KeySpace(layer, mean.contiguous(), scale.contiguous())


def entry_key(model: nn.Module, tokenizer: Any, group: EditGroup, space: KeySpace, negatives: torch.Tensor,
              routing: RoutingConfig, max_paraphrases: int = 30,
              forms: Mapping[str, SubjectMatcher] | None = None) -> RoutingKey | None:
    """The group's key in ``space`` (``None`` when no text of the group shows its subject), its threshold
    calibrated on ``negatives`` (projected negative states, see ``calibrate_key_space``). ``forms``: per
    language, the matcher of the subject and its aliases when already built (``PreparedEdit.forms``)."""
    per_language = []
    for lang, edit in group.edits.items():
        matcher = forms[lang] if forms is not None else SubjectMatcher([edit.subject, *edit.aliases])
        texts = [edit.prompt, *[p for p in edit.paraphrases[:max_paraphrases] if matcher.find(p)]]
        vectors = []
        for ids, hidden in layer_inputs(model, tokenizer, texts, space.layer):
            positions = subject_token_positions(tokenizer, ids, matcher)
            if positions:
                vectors.append(space.project(hidden[positions]).mean(dim=0))
        if vectors:
            per_language.append(torch.stack(vectors).mean(dim=0))
    if not per_language:
        return None
    key = torch.stack(per_language).mean(dim=0)
    key = (key / key.norm().clamp_min(1e-12)).contiguous()
    highest = float((negatives @ key).max()) if negatives.numel() else -1.0
    heads = head_states(model, tokenizer, group, space)
    if heads.numel():
        highest = max(highest, float((heads @ key).max()))
    threshold = min(1.0, max(routing.threshold_floor, highest + routing.threshold_margin))
    return RoutingKey(space, key, threshold)


def subject_head(subject: str) -> str | None:
    """The end of a subject that names its kind rather than the entity: the last word in scripts written
    with spaces ("massacre" of "Suryamani massacre") or apart by a middle dot ("泰勒" of "约翰·布莱恩·泰勒"), the
    last third (2+ characters) of a subject written without spaces ("大屠杀" of "苏里亚马尼大屠杀"); ``None`` for
    a subject of one word (or under 4 characters)."""
    words = subject.replace("\u00b7", " ").replace("\u30fb", " ").split()  # "约翰·布莱恩·泰勒": words apart by ·
    if len(words) > 1:
        return words[-1]
    if len(subject) >= 4 and all(is_spaceless_char(char) for char in subject[-2:]):
        return subject[-max(2, -(-len(subject) // 3)):]
    return None


def head_states(model: nn.Module, tokenizer: Any, group: EditGroup, space: KeySpace) -> torch.Tensor:
    """Projected states at the head of each language's subject standing alone in its edit prompt ("What's the
    significance of the massacre?"): hard negatives, since a small model's state at a subject's last token
    can say more about its kind than about the entity (measured on Gemma-3-270M: "Innsbruck Cathedral"'s key
    fired at "the Florence cathedral", "Suryamani massacre"'s at "the Boston massacre"). (N, hidden)."""
    texts, heads = [], []
    for edit in group.edits.values():
        head = subject_head(edit.subject)
        if head is not None and edit.subject in edit.prompt:
            texts.append(edit.prompt.replace(edit.subject, head, 1))
            heads.append(head)
    vectors = []
    for (ids, hidden), head in zip(layer_inputs(model, tokenizer, texts, space.layer), heads):
        positions = subject_token_positions(tokenizer, ids, SubjectMatcher([head]))
        if positions:
            vectors.append(space.project(hidden[positions[:1]]))
    return torch.cat(vectors) if vectors else torch.zeros(0)


def separate(bank: EditBank, entry: BankEntry, margin: float) -> tuple[BankEntry, list[BankEntry]]:
    """Calibrate ``entry``'s key against the bank's other keys (of the same key space): no key may fire on
    another entry's key. Returns (``entry`` with its threshold raised to the highest cosine with another key
    plus ``margin`` where needed, the bank's entries whose thresholds must rise likewise, updated).

    One matrix-vector product over the bank's keys; two entries on the same subject get thresholds near 1, so
    they route lexically (and by relation choice) only.
    """
    if entry.key is None:
        return entry, []
    same: dict[int, bool] = {}  # id(space) -> same as the entry's (entries made together share one object)
    others = [e for e in bank if e.key is not None and e.id != entry.id
              and same.setdefault(id(e.key.space), e.key.space is entry.key.space or e.key.space.same_as(entry.key.space))]
    if not others:
        return entry, []
    cosines = torch.stack([e.key.vector for e in others if e.key is not None]) @ entry.key.vector  # (N,)
    needed = cosines + margin
    raised = [dataclasses.replace(e, key=dataclasses.replace(e.key, threshold=min(1.0, float(need))))
              for e, need in zip(others, needed.tolist()) if e.key is not None and need > e.key.threshold]
    top = min(1.0, float(needed.max()))
    if top > entry.key.threshold:
        entry = dataclasses.replace(entry, key=dataclasses.replace(entry.key, threshold=top))
    return entry, raised


def separate_all(bank: EditBank, margin: float, block: int = 1024) -> int:
    """``separate`` for every pair of the bank's keys at once (after merging banks edited apart, e.g. the
    shards of a distributed edit): every threshold is raised to at least the highest cosine with another
    key of the same space plus ``margin``. The result equals editing the entries one after another into one
    bank. Returns how many entries changed (replaced in place, order kept)."""
    groups: dict[int, list[BankEntry]] = {}  # first space object of a group -> its entries
    group_of: dict[int, int] = {}  # id(space) -> the group it belongs to
    for entry in bank:
        if entry.key is None:
            continue
        space = entry.key.space
        if id(space) not in group_of:
            group_of[id(space)] = next((first for first, members in groups.items()
                                        if members[0].key is not None and members[0].key.space.same_as(space)), id(space))
        groups.setdefault(group_of[id(space)], []).append(entry)
    changed = 0
    for entries in groups.values():
        if len(entries) < 2:
            continue
        keys = torch.stack([e.key.vector for e in entries if e.key is not None])
        highest = torch.empty(len(entries))
        for start in range(0, len(entries), block):
            cosines = keys[start : start + block] @ keys.T
            rows = torch.arange(cosines.shape[0])
            cosines[rows, rows + start] = -2.0  # not with itself
            highest[start : start + block] = cosines.max(dim=1).values
        for entry, top in zip(entries, (highest + margin).clamp(max=1.0).tolist()):
            if entry.key is not None and top > entry.key.threshold:
                bank.replace(dataclasses.replace(entry, key=dataclasses.replace(entry.key, threshold=top)))
                changed += 1
    return changed
