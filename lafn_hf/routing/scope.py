"""Question scopes: an entry fires only on questions that ask its own relation (issue: Locality-Hard).

A subject names an entity; the words around it name the relation asked. An entry's scope is read from the
hidden states entering its first edited layer, pooled (mean) over the tokens of the subject's sentence that
lie outside the subject ("Who designed | the Eiffel Tower | ?"), and projected as in a ``ScopeSpace``: (h -
mean) / scale, then onto the directions that tell the built-in relation prompts apart (``data/relations.json``:
46 relations, each as a question and as a statement to complete, in en, zh, de, fr, es, ru, filled with
stand-in subjects; ``discriminant_basis``), as unit vectors. What varies within one relation (language,
wording, subject) is what the basis leaves out.

The entry keeps its own prompts' vectors (every language and paraphrase) and the
relation whose built-in questions lie nearest to them (``QuestionScope.relation``). A question is in scope
when its vector is nearer to those (the nearest cosine) than to any other relation's built-in questions, by
at least the entry's margin: a nearest-neighbour rule between "this fact" and "other facts of a subject".
Measured on MzsRE dev en+zh (Gemma-3-270M, 150 items, margin -0.1): rephrasings pass 91-93% and same-subject
other-relation questions 3-7% (85% / 5% on 50 items before the discriminant basis; a single cosine threshold on
the prompts alone, the design's first try, let 46-60% of other-relation questions through at 95% of rephrasings).

The causal rule: the sentence is bounded by the tokens that end one ("?", "!", "。", a line break or a special
token such as a chat-turn marker; not ".", which abbreviations use) and read within the forward that reads the
subject, up to that forward's end: a prompt or a later chat turn is seen whole, a token generated one at a
time sees what precedes it in its own forward, i.e. nothing. Tokens read by earlier forwards (the KV cache) do
not count. A subject with no word of its sentence beside it in that span is out of scope, so a subject the
model generates token by token does not fire its entry. Decoding with a KV cache equals full forwards over the
same tokens whenever each subject's sentence ends inside the forward that reads the subject (a question, a
chat turn: tested); a prompt cut mid-sentence, read again together with generated tokens
(``generate(use_cache=False)``), and assisted decoding, whose rolled-back drafts were read in the subject's
forward, can decide otherwise.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch import nn

from ..bank.entries import QuestionScope, ScopeSpace
from ..bank.spaces import project
from ..request import EditGroup
from .keys import key_space, layer_inputs
from .matcher import SubjectMatcher
from .row_reader import RowReader, decoder_for

#: Stand-in subjects the built-in relation questions are filled with (their vectors are averaged).
STAND_INS = ("Marie Curie", "Toyota", "Hamlet")
_ENDS = ("?", "\uff1f", "!", "\uff01", "\u3002")  # ? ？ ! ！ 。


@cache
def _relations_file() -> dict[str, Any]:
    return json.loads(resources.files("lafn_hf.routing").joinpath("data/relations.json").read_text("utf-8"))


@cache
def relation_templates() -> dict[str, tuple[str, ...]]:
    """The built-in relation prompts with ``{s}``: language -> the questions, then the statements to complete,
    each in the order of the relations (prompt ``i`` asks relation ``i % len(relation_names())``)."""
    raw = _relations_file()
    return {lang: (*questions, *raw["statements"][lang]) for lang, questions in raw["questions"].items()}


@cache
def relation_names() -> tuple[str, ...]:
    """The built-in relations, by Wikidata property ("P57 director", ...)."""
    return tuple(_relations_file()["_relations"])


def ends_sentence(piece: str) -> bool:
    """Whether a token's text ends a sentence: a line break (special tokens read as one) or an end mark."""
    return "\n" in piece or piece.rstrip().endswith(_ENDS)


def sentence_window(reader: RowReader, position: int, subject_length: int, first: int, last: int) -> list[int]:
    """Positions in ``[first, last]`` of the sentence around the subject completed at ``position`` (its text
    ``subject_length`` characters long), outside the subject: back to the previous sentence end, on through
    the next one. Padding and special tokens are left out."""
    start_char = reader.ends[position] - subject_length
    head = position
    while head > first and reader.ends[head - 1] > start_char:
        head -= 1
    left = head
    while left > first and not ends_sentence(reader.pieces[left - 1]):
        left -= 1
    right = position
    while right < last and not (right > position and ends_sentence(reader.pieces[right])):
        right += 1
    special = reader.special_ids
    return [p for p in (*range(left, head), *range(position + 1, right + 1))
            if reader.tokens[p] is not None and reader.tokens[p] not in special]


def visible_last(reader: RowReader, position: int, forward_end: int) -> int:
    """The last position the occurrence completed at ``position`` may read: the end of the forward that reads it
    (of the first forward's prompt, for a position in it). See the module docstring."""
    return min(forward_end, reader.whole_until - 1) if position < reader.whole_until else forward_end


def occurrence_states(tokenizer: Any, texts: Sequence[str], subjects: Sequence[Sequence[str]],
                      states: Sequence[tuple[list[int], torch.Tensor]]) -> list[torch.Tensor]:
    """The pooled state of each subject occurrence found in each text (``states``: ``layer_inputs`` of
    ``texts``), read by the inference rule for a prompt: (hidden,) float32 tensors, unprojected."""
    decode, special = decoder_for(tokenizer), frozenset(int(i) for i in tokenizer.all_special_ids)
    pooled = []
    for (ids, hidden), forms in zip(states, subjects):
        reader = RowReader(decode, special)
        reader.read(list(ids))
        for hit in reader.hits(SubjectMatcher(list(forms)), 0):
            window = sentence_window(reader, hit.position, len(hit.subject), 0,
                                     visible_last(reader, hit.position, len(ids) - 1))
            if window:
                pooled.append(hidden[window].mean(dim=0))
    return pooled


def calibrate_scope_space(model: nn.Module, tokenizer: Any, layer: int, discriminant: bool = True) -> ScopeSpace:
    """The scope space of ``layer``: the built-in relation questions, each the mean over ``STAND_INS``; with
    ``discriminant`` (the default) projected onto the directions that tell their relations apart
    (``discriminant_basis``), else compared whole after scaling (banks made before)."""
    count = len(relation_names())
    texts, forms, rows = [], [], []
    for prompts in relation_templates().values():
        for index, prompt in enumerate(prompts):
            for stand_in in STAND_INS:
                texts.append(prompt.format(s=stand_in))
                forms.append((stand_in,))
            rows.append(index % count)
    pooled = occurrence_states(tokenizer, texts, forms, layer_inputs(model, tokenizer, texts, layer))
    if len(pooled) != len(texts):
        raise RuntimeError(f"{len(texts) - len(pooled)} built-in relation questions show no stand-in subject")
    return scope_space(layer, torch.stack(pooled).reshape(len(rows), len(STAND_INS), -1),
                       torch.tensor(rows, dtype=torch.int64), discriminant)


def scope_space(layer: int, states: torch.Tensor, relations: torch.Tensor, discriminant: bool = True) -> ScopeSpace:
    """The scope space of pooled ``states`` (R, S, hidden): template ``r`` asks ``relations[r]``, read with S
    stand-in subjects (averaged into its vector; the discriminant basis learns from each one)."""
    vectors = states.mean(dim=1)
    space = key_space(layer, vectors)
    basis = None
    if discriminant and relations.unique().numel() > 1:
        scaled = (states.flatten(0, 1) - space.mean) / space.scale
        basis = discriminant_basis(scaled, relations.repeat_interleave(states.shape[1])).contiguous()
    templates = project(vectors, space.mean, space.scale, basis).contiguous()
    return ScopeSpace(layer, space.mean, space.scale, templates, relations, basis)


#: Ridge added to the within-relation covariance, as a fraction of its mean eigenvalue (``discriminant_basis``).
#: Chosen on MzsRE dev (Gemma-3-270M, en+zh/de/fr, 150 items each): rephrasings against same-subject
#: other-relation questions separate alike (areas within 0.02) from 0.003 to 0.1 (docs/scope.md).
SHRINKAGE = 0.1


def discriminant_basis(vectors: torch.Tensor, classes: torch.Tensor, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """The (k, width) directions along which ``classes`` of ``vectors`` (N, width) differ most against how
    each class varies within itself (Fisher's linear discriminants, k = min(distinct classes - 1, width)): the
    within-class covariance (plus ``shrinkage`` times its mean eigenvalue on the diagonal) is whitened, then the
    class means' principal directions kept. Here a class is a relation; what varies within it is the subject,
    the language and the phrasing, which a scope must not read. ``classes``: (N,) integer labels, any values."""
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or not vectors.is_floating_point():
        raise TypeError(f"vectors must be a 2-D floating-point tensor, got {type(vectors).__name__} "
                        f"{tuple(getattr(vectors, 'shape', ()))}")
    if not isinstance(classes, torch.Tensor) or classes.shape != (vectors.shape[0],) or classes.is_floating_point():
        raise TypeError(f"classes must be a ({vectors.shape[0]},) integer tensor, got {type(classes).__name__} "
                        f"{tuple(getattr(classes, 'shape', ()))}")
    labels, classes = classes.unique(return_inverse=True)
    if labels.numel() < 2:
        raise ValueError(f"discriminant directions need at least 2 classes, got {labels.numel()}")
    data = vectors.double()
    count = labels.numel()
    sizes = torch.bincount(classes, minlength=count).unsqueeze(1).double()
    means = torch.zeros(count, data.shape[1], dtype=torch.float64).index_add_(0, classes, data) / sizes
    within = data - means[classes]
    values, axes = torch.linalg.eigh(within.T @ within / data.shape[0])
    values = values.clamp_min(0)
    values = values + max(shrinkage * float(values.mean()), 1e-12)
    whiten = axes @ torch.diag(values.rsqrt()) @ axes.T
    between = (means - data.mean(dim=0)) @ whiten
    k = min(count - 1, data.shape[1])
    directions = torch.linalg.svd(between, full_matrices=False).Vh[:k]
    return (directions @ whiten).float()


def group_texts(group: EditGroup, max_paraphrases: int) -> tuple[list[str], list[tuple[str, ...]]]:
    """The texts of every language of ``group`` that ask its fact (prompt, paraphrases) and their surface forms."""
    texts, forms = [], []
    for edit in group.edits.values():
        names = (edit.subject, *edit.aliases)
        for text in (edit.prompt, *edit.paraphrases[:max_paraphrases]):
            texts.append(text)
            forms.append(names)
    return texts, forms


def entry_scope(model: nn.Module, tokenizer: Any, group: EditGroup, space: ScopeSpace, margin: float,
                max_paraphrases: int = 30) -> QuestionScope | None:
    """The group's question scope in ``space`` (``None`` when no text shows its subject with words beside it)."""
    texts, forms = group_texts(group, max_paraphrases)
    pooled = occurrence_states(tokenizer, texts, forms, layer_inputs(model, tokenizer, texts, space.layer))
    if not pooled:
        return None
    vectors = space.project(torch.stack(pooled))
    return QuestionScope(space, vectors.contiguous(), nearest_relation(space, vectors), margin)


def neighbour_prompts(group: EditGroup, relation: int, count: int, seed: int) -> dict[str, list[str]]:
    """Per language of ``group`` with built-in prompts, ``count`` statements to complete about its subject in
    other relations than ``relation`` (seeded; the same relations in every language): the neighbourhood whose
    next-token distribution an edit should leave alone (``LafnConfig.neighbour_kl``)."""
    templates = relation_templates()
    total = len(relation_names())
    others = [r for r in range(total) if r != relation]
    chosen = sorted(random.Random(seed).sample(others, min(count, len(others))))
    return {lang: [templates[lang][total + r].format(s=edit.subject) for r in chosen]
            for lang, edit in group.edits.items() if lang in templates}


def nearest_relation(space: ScopeSpace, vectors: torch.Tensor) -> int:
    """The relation whose built-in questions are nearest to ``vectors`` (mean over them of the best cosine)."""
    if not space.templates.numel():
        return -1
    cosines = vectors @ space.templates.T  # (P, R)
    count = int(space.relations.max()) + 1
    best = torch.full((vectors.shape[0], count), -2.0).scatter_reduce(
        1, space.relations.expand(vectors.shape[0], -1), cosines, reduce="amax")
    return int(best.mean(dim=0).argmax())


class ScopeIndex:
    """One entry's scope on the model's device, ready to judge pooled states. ``space``: its space on that device
    (``ScopeSpace.to``), shared by every entry of the space (not copied per entry)."""

    def __init__(self, scope: QuestionScope, space: ScopeSpace, margin: float | None) -> None:
        self.space = space
        self.vectors = scope.vectors.to(space.templates.device)
        self.templates = space.templates
        self.own = space.relations == scope.relation
        self.margin = scope.margin if margin is None else margin

    def margins(self, pooled: torch.Tensor) -> torch.Tensor:
        """(nearest own cosine) - (nearest other relation's cosine) of each pooled state (n, hidden)."""
        states = self.space.project(pooled)
        own = (states @ self.vectors.T).max(dim=1).values
        if not self.templates.shape[0]:
            return own + 2.0
        cosines = states @ self.templates.T  # (n, R)
        own = torch.maximum(own, cosines.masked_fill(~self.own, -2.0).max(dim=1).values)
        return own - cosines.masked_fill(self.own, -2.0).max(dim=1).values
