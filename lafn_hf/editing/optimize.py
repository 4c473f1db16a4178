"""Optimise the update dV of the located neurons (paper section 2.3, Eq. 6-9).

Eq. 6: F_(theta, V_D + dV_D)(x_l^e) = y_l^e, dV added at the last subject token of x_l^e.
Eq. 7: L_target = 1/(|L| M) sum_l sum_m -log P_F'(y_l^e | p_l^m + x_l^e)
Eq. 8: L_kl = 1/|L| sum_l KL[P_F(. | q_l) || P_F'(. | q_l)],  q_l = "{s_l} is a" in language l
Eq. 9: L = lambda_1 L_target + lambda_2 L_kl

Beyond the paper, L_target also averages over the bare prompt (``include_bare_prompt``) and over variants of it
with one word left out (``question_variants``), each answer is followed by its trained ending
(``answer_boundary``), and the next-token distributions after the answer are held to the unedited model's
reading the same answer (``continuation_kl``), so the edited answer goes on as answers go on instead of
repeating its target.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lafn_hf.modeling import decoder_layers, mlp_parts, text_config

from ..config import LafnConfig
from ..hooks import ForwardScope, SkippedLayer
from ..request import EditGroup
from ..text import is_word_char, needs_word_boundary, nfc
from ..tokens import encode_texts, pad_batch, pad_id, sample_top_k, stop_ids, target_separator, word_continuations
from ..values import LayerPlan, ValueInjection, hit_tensor
from .prepared import PreparedEdit, prepare

logger = logging.getLogger(__name__)

#: A target "token" meaning "the word ends here": its NLL is -log of the probability of every token that does
#: not continue the word (``TrainingBatch.continues_word``), trained after a target of a spaced script when no
#: punctuation follows it (``LafnConfig.answer_boundary``), so "Krieg" is not read on into "Krieger".
WORD_END = -1


@dataclass
class TrainingBatch:
    """All sequences of one optimisation step, right-padded: target rows first, then KL rows."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    subject_hits: list[tuple[int, int]]  # (row, last subject token) for every row
    target_rows: torch.Tensor  # (N,) row of each target token
    target_positions: torch.Tensor  # (N,) position of each target token
    target_ids: torch.Tensor  # (N,) the target token ids
    target_sequence: torch.Tensor  # (N,) index of the training sequence the token belongs to
    sequence_language: list[str]  # language of each training sequence
    report_sequence: dict[str, int]  # per language, the sequence whose probability is reported
    kl_rows: torch.Tensor  # (L,) rows of the "{subject} is a" prompts, then of the positions after the answers
    kl_positions: torch.Tensor  # (L,) their last token; after an answer, the position that predicts what follows
    # (V,) the tokens that continue a word (``word_continuations``); set when a target id is ``WORD_END``
    continues_word: torch.Tensor | None = None
    # (N,) bool: the token ends the answer after the target (trained punctuation, ``WORD_END``) rather than
    # being part of the target; None: no such token. Early stopping looks at the target's own tokens only.
    ending: torch.Tensor | None = None
    # (L,) bool: the KL entry reads what follows an answer (``LafnConfig.continuation_kl``) rather than a
    # "{subject} is a" prompt; None: there are none
    continuation: torch.Tensor | None = None
    # (E,) indices of the ``WORD_END`` entries among the N target tokens: found once here, so a step needs no host read
    word_ends: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.continues_word is not None:
            self.word_ends = (self.target_ids == WORD_END).nonzero().flatten()


@dataclass
class OptimizationResult:
    deltas: dict[int, torch.Tensor]  # layer -> (n,) float32 on CPU
    loss_curve: list[float] = field(default_factory=list)
    target_loss_curve: list[float] = field(default_factory=list)
    target_probabilities: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def sample_prefixes(model: nn.Module, tokenizer: Any, languages: Sequence[str], config: LafnConfig) -> dict[str, list[str]]:
    """M random prefixes per language, sampled from the model itself (top-k 5), seeded."""
    if config.num_prefixes == 0:
        return {lang: [] for lang in languages}
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither bos_token_id nor eos_token_id to start random prefixes from")
    device = next(model.parameters()).device
    count = config.num_prefixes * len(languages)
    input_ids = torch.full((count, 1), int(start), dtype=torch.long, device=device)
    output = sample_top_k(model, tokenizer, input_ids, torch.ones_like(input_ids), config.seed, config.prefix_length,
                          exact_length=True)
    texts = [nfc(" ".join(t.split())) for t in tokenizer.batch_decode(output[:, 1:], skip_special_tokens=True)]
    return {lang: texts[i * config.num_prefixes : (i + 1) * config.num_prefixes] for i, lang in enumerate(languages)}


class PrefixCache:
    """Memoised ``sample_prefixes`` for the edits of one model: the base weights never change under LAFN, so
    the prefixes depend only on the number of languages, the prefix settings, the seed and the device.
    (A caller that changes the base weights itself should make a new cache.) Thread-safe; bounded."""

    def __init__(self, limit: int = 32) -> None:
        self._limit = limit
        self._entries: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PrefixCache({len(self._entries)} of {self._limit})"

    def get(self, model: nn.Module, tokenizer: Any, languages: Sequence[str], config: LafnConfig) -> dict[str, list[str]]:
        parameter = next(model.parameters())
        key = (len(languages), config.num_prefixes, config.prefix_length, config.seed, str(parameter.device),
               parameter.dtype)
        with self._lock:
            texts = self._entries.get(key)
            if texts is not None:
                self._entries.move_to_end(key)
        if texts is None:
            sampled = sample_prefixes(model, tokenizer, [str(i) for i in range(len(languages))], config)
            texts = [text for i in range(len(languages)) for text in sampled[str(i)]]
            with self._lock:
                self._entries[key] = texts
                while len(self._entries) > self._limit:
                    self._entries.popitem(last=False)
        count = config.num_prefixes
        return {lang: texts[i * count : (i + 1) * count] for i, lang in enumerate(languages)}


_ANSWER_ENDS = frozenset(",.;:!?\u3002\uff0c\u3001\uff1b\uff1a\uff01\uff1f")  # , . ; : ! ? and their CJK forms


def answer_ending(answer: str) -> str:
    """The punctuation right after the first word of ``answer`` ("Paris, France" -> ","; "巴黎。" -> "。"), if it is
    one that ends an answer; "" otherwise ("Jean-Pierre Dupont." -> "", "Paris is ..." -> "")."""
    text = answer.strip()
    end = 0
    while end < len(text) and (is_word_char(text[end]) or text[end] in "-'\u2019"):
        end += 1
    return text[end] if 0 < end < len(text) and text[end] in _ANSWER_ENDS else ""


def answer_boundaries(model: nn.Module, tokenizer: Any, group: EditGroup, new_tokens: int = 8) -> dict[str, str]:
    """Per language, the punctuation that ends the first word of the model's own greedy answer ('' if none)."""
    return answer_boundaries_many(model, tokenizer, [group], new_tokens)[0]


def answer_boundaries_many(model: nn.Module, tokenizer: Any, groups: Sequence[EditGroup],
                           new_tokens: int = 8) -> list[dict[str, str]]:
    """``answer_boundaries`` of every group from one left-padded greedy ``generate`` over all their prompts:
    ``new_tokens`` decoding steps in all instead of that many per prompt (on a GPU, where each step costs the
    same for 1 or 100 rows, 8 steps instead of 8 per language and group). Equal to one prompt at a time up to
    the rounding that padding brings (a near tie in half precision can pick another first word; on Gemma-3-270M
    in float32, 66 of 66 en+fr dev prompts gave the same ending)."""
    prompts = [edit.prompt for group in groups for edit in group.edits.values()]
    input_ids, attention_mask = encode_texts(tokenizer, prompts, next(model.parameters()).device, left=True)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,  # type: ignore[operator]
                            max_new_tokens=new_tokens, pad_token_id=pad_id(tokenizer))
    answers = iter(tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True))
    return [{lang: answer_ending(next(answers)) for lang in group.edits} for group in groups]


def answered(context: str, target: str, ending: str) -> str:
    """``context`` answered with ``target`` and the trained ``ending`` (kept only after a word character: "伦夸城。"
    already has one), as every training sequence writes it."""
    return context + target_separator(context, target) + target + (ending if is_word_char(target[-1]) else "")


def answer_continuations_many(model: nn.Module, tokenizer: Any, groups: Sequence[EditGroup],
                              boundaries: Sequence[dict[str, str] | None], new_tokens: int) -> list[dict[str, list[int]]]:
    """Per group and language, the unedited model's greedy ``new_tokens`` after the prompt answered with the
    target (and its trained ending), cut before the first end-of-text token: what the answer is followed by
    when the model reads it unedited. One left-padded ``generate`` over all of them."""
    texts = [answered(edit.prompt, edit.target, (ends or {}).get(lang, ""))
             for group, ends in zip(groups, boundaries) for lang, edit in group.edits.items()]
    input_ids, attention_mask = encode_texts(tokenizer, texts, next(model.parameters()).device, left=True)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,  # type: ignore[operator]
                            max_new_tokens=new_tokens, pad_token_id=pad_id(tokenizer))
    ends = stop_ids(tokenizer, getattr(model, "generation_config", None))
    rows = iter(output[:, input_ids.shape[1]:].tolist())
    return [{lang: _until(next(rows), ends) for lang in group.edits} for group in groups]


def _until(ids: list[int], stops: frozenset[int]) -> list[int]:
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def build_batch(tokenizer: Any, group: EditGroup | PreparedEdit, prefixes: dict[str, list[str]], config: LafnConfig,
                device: torch.device, boundaries: dict[str, str] | None = None,
                neighbours: dict[str, list[str]] | None = None,
                continuations: dict[str, list[int]] | None = None) -> TrainingBatch:
    """The training sequences of ``group`` (prepared here when it is not yet); ``neighbours``: more KL prompts per
    language (other relations of the subject, ``LafnConfig.neighbour_kl``), each read at its last token like
    "{subject} is a"; ``continuations``: per language, the unedited model's tokens after the answered bare prompt
    (``answer_continuations_many``), appended to every sequence of the language and read there by the
    ``LafnConfig.continuation_kl`` KL entries against the unedited model reading that very sequence (none given:
    only the answer's next token)."""
    prepared = prepare(group, config)
    rows: list[list[int]] = []
    hits: list[tuple[int, int]] = []
    targets: list[tuple[int, int, int, int]] = []  # (row, position, token, sequence)
    endings: list[bool] = []  # per target token: after the target (punctuation, WORD_END)
    languages: list[str] = []
    report: dict[str, int] = {}
    held: list[tuple[int, int]] = []  # (row, position) whose next-token distribution is held after the answer
    for lang, language in prepared.languages.items():
        edit, questions = language.edit, language.questions
        following = (continuations or {}).get(lang, [])[: max(config.continuation_kl - 1, 0)]
        contexts = [*questions, *(f"{p} {edit.prompt}" if p else edit.prompt for p in prefixes.get(lang, []))]
        if config.include_bare_prompt:
            contexts.append(edit.prompt)
        for context in contexts:
            ending = (boundaries or {}).get(lang, "") if is_word_char(edit.target[-1]) else ""  # "伦夸城。" has one
            text = answered(context, edit.target, "")
            encoded = tokenizer(text + ending, return_offsets_mapping=True)
            ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
            row, sequence = len(rows), len(languages)
            try:
                hits += [(row, p) for p in language.subject_positions(tokenizer, ids, context)]
            except ValueError:
                if context in questions:  # a left-out word let the subject's last token merge: train without it
                    continue
                raise
            target_tokens = [j for j, (_, end) in enumerate(offsets) if end > len(context) and j > 0]
            if not target_tokens:
                raise ValueError(f"target {edit.target!r} ({lang}) produced no tokens after the prompt")
            targets += [(row, j, ids[j], sequence) for j in target_tokens]
            endings += [offsets[j][0] >= len(text) for j in target_tokens]  # one holding the target's end is its
            if boundaries is not None and not ending and needs_word_boundary(edit.target[-1]):
                targets.append((row, len(ids), WORD_END, sequence))
                endings.append(True)
            if config.continuation_kl:
                held += [(row, len(ids) - 1 + k) for k in range(len(following) + 1)]
            rows.append(ids + following)
            languages.append(lang)
        report[lang] = len(languages) - 1  # the last context: the bare prompt
    kl_rows, kl_positions = [], []
    for lang, language in prepared.languages.items():
        for prompt in (language.kl_prompt, *(neighbours or {}).get(lang, [])):
            encoded = tokenizer(prompt, return_offsets_mapping=True)
            hits += [(len(rows), p) for p in language.subject_positions(tokenizer, encoded["input_ids"], prompt)]
            kl_rows.append(len(rows))
            kl_positions.append(len(encoded["input_ids"]) - 1)
            rows.append(list(encoded["input_ids"]))
    kl_rows += [row for row, _ in held]
    kl_positions += [position for _, position in held]
    input_ids, attention_mask = pad_batch(rows, pad_id(tokenizer), device)
    column = list(zip(*targets))
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    continues_word = word_continuations(tokenizer).to(device) if WORD_END in column[2] else None
    continuation = torch.arange(len(kl_rows), device=device) >= len(kl_rows) - len(held) if held else None
    return TrainingBatch(input_ids, attention_mask, hits, as_long(column[0]), as_long(column[1]), as_long(column[2]),
                         as_long(column[3]), languages, report, as_long(kl_rows), as_long(kl_positions),
                         continues_word, torch.tensor(endings, device=device) if any(endings) else None, continuation)


@contextmanager
def upper_layers_only(model: nn.Module, first: int, hidden_in: torch.Tensor) -> Iterator[None]:
    """Run only layers >= ``first`` in this thread: lower layers are wrapped in ``SkippedLayer`` (restored in finally).

    ``hidden_in`` is the input of layer ``first`` from a full forward of the same batch; it does not
    depend on dV, which is only added at layers >= ``first``. Concurrent forwards of other threads run
    the whole model as usual.
    """
    layers = decoder_layers(model)
    originals = [layer.original if isinstance(layer, SkippedLayer) else layer for layer in layers[:first]]
    with ForwardScope() as scope:
        try:
            for i in range(first):
                layers[i] = SkippedLayer(originals[i], scope, hidden_in if i == first - 1 else None)
            yield
        finally:
            for i, module in enumerate(originals):
                layers[i] = module


def selected_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float32 logits at (rows, positions) only: (N, V). The LM head runs on N vectors, not B*T."""
    decoder = model.get_decoder()  # type: ignore[operator]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, positions]).float()  # type: ignore[operator]
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while optimising (a model already in eval mode, the usual case, is left untouched)."""
    was_training = model.training
    try:
        if was_training:
            model.eval()
        yield
    finally:
        if was_training:
            model.train(True)


class _BaseRun:
    """One full forward without dV: the input of the first edited layer, base KL log-probs and ||V||."""

    def __init__(self, model: nn.Module, batch: TrainingBatch, layers: Sequence[int]) -> None:
        modules = decoder_layers(model)
        captured: dict[str, torch.Tensor] = {}
        hit_norms: dict[int, torch.Tensor] = {}
        rows = torch.tensor([r for r, _ in batch.subject_hits], dtype=torch.long)
        positions = torch.tensor([p for _, p in batch.subject_hits], dtype=torch.long)

        def capture_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

        def capture_values(layer: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                hit_norms[layer] = args[0][rows, positions].float().norm(dim=-1)
            return hook

        with ForwardScope() as scope, torch.no_grad():
            scope.pre_hook(modules[layers[0]], capture_input, with_kwargs=True)
            for layer in layers:
                scope.pre_hook(mlp_parts(modules[layer]).down_proj, capture_values(layer))
            logits = selected_logits(model, batch.input_ids, batch.attention_mask, batch.kl_rows, batch.kl_positions)
        self.hidden_in = captured["hidden"]
        self.kl_log_probs = torch.log_softmax(logits, dim=-1)
        self.hit_value_norms = hit_norms  # layer -> ||V|| at each subject hit
        self.value_norms = {layer: norms.mean() for layer, norms in hit_norms.items()}


def _losses(logits: torch.Tensor, batch: TrainingBatch, base: _BaseRun,
            config: LafnConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed target NLL per sequence (S,), L_target (Eq. 7), the weighted KL terms (``kl_penalty``), the
    target's fit) from the selected logits.

    L_target averages each sequence's mean per-token NLL over sequences (languages x contexts). The fit is the
    same without the tokens that end the answer (``TrainingBatch.ending``), its mean over sequences or its
    highest (``LafnConfig.early_stop_on``): early stopping reads it.
    """
    total, sequence_nll, edited, fit = sequence_losses(logits, batch)
    kl_each = (base.kl_log_probs.exp() * (base.kl_log_probs - edited)).sum(-1)
    penalty = (config.lambda_kl * kl_each.mean() if batch.continuation is None
               else kl_penalty(kl_each, batch.continuation, torch.zeros_like(batch.kl_rows), 1, config)[0])
    return total, sequence_nll.mean(), penalty, fit.max() if config.early_stop_on == "worst" else fit.mean()


def kl_penalty(kl_each: torch.Tensor, continuation: torch.Tensor | None, group: torch.Tensor, groups: int,
               config: LafnConfig) -> torch.Tensor:
    """Per group (G,): ``lambda_kl`` x the mean KL of its "{subject} is a" prompts (Eq. 8), plus
    ``lambda_continuation`` x the mean KL after its answers (``TrainingBatch.continuation``). ``group``: the
    group of each KL entry. Masked sums, no boolean index: no host read."""
    zeros = torch.zeros(groups, device=kl_each.device)

    def mean(weights: torch.Tensor) -> torch.Tensor:
        return zeros.index_add(0, group, kl_each * weights) / zeros.index_add(0, group, weights).clamp_min(1)

    if continuation is None:
        return config.lambda_kl * mean(torch.ones_like(kl_each))
    held = continuation.to(kl_each.dtype)
    return config.lambda_kl * mean(1 - held) + config.lambda_continuation * mean(held)


def sequence_losses(logits: torch.Tensor,
                    batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed target NLL per sequence, mean per-token NLL per sequence, log-probs at the KL rows, mean per-token
    NLL per sequence over the target's own tokens) from the selected logits (target positions first, then KL
    rows). No host read: the ``WORD_END`` entries are indexed by ``batch.word_ends``."""
    count = batch.target_ids.numel()
    log_probs = torch.log_softmax(logits[:count], dim=-1)
    token_nll = -log_probs.gather(1, batch.target_ids.clamp(min=0)[:, None]).squeeze(1)
    if batch.continues_word is not None and batch.word_ends is not None:
        ends = batch.word_ends
        ended = log_probs[ends].masked_fill(batch.continues_word, float("-inf"))  # no boolean index: no host read
        token_nll = token_nll.index_put((ends,), -torch.logsumexp(ended, dim=-1))
    sequences = len(batch.sequence_language)
    total = torch.zeros(sequences, device=logits.device).index_add(0, batch.target_sequence, token_nll)
    tokens = torch.zeros(sequences, device=logits.device).index_add(0, batch.target_sequence, torch.ones_like(token_nll))
    mean = fit = total / tokens
    if batch.ending is not None:
        own = (~batch.ending).to(token_nll.dtype)
        own_tokens = torch.zeros_like(total).index_add(0, batch.target_sequence, own)
        own_nll = torch.zeros_like(total).index_add(0, batch.target_sequence, token_nll * own)
        fit = torch.where(own_tokens > 0, own_nll / own_tokens.clamp_min(1), fit)  # all ending: the whole answer
    return total, mean, torch.log_softmax(logits[count:], dim=-1), fit


def optimize_update(model: nn.Module, tokenizer: Any, edit: EditGroup | PreparedEdit, neurons: dict[int, torch.Tensor],
                    config: LafnConfig, progress: bool = False, prefixes: PrefixCache | None = None,
                    neighbours: dict[str, list[str]] | None = None) -> OptimizationResult:
    """Adam on dV (zero init, float32) minimising Eq. 9; early stop on the target's fit (``_losses``); norm clamp per layer.
    ``prefixes``: a cache of the sampled prefixes shared by the edits of one model (sampled anew without);
    ``neighbours``: more KL prompts per language (``build_batch``)."""
    layers = sorted(layer for layer, idx in neurons.items() if idx.numel())
    if not layers:
        raise ValueError("no language-agnostic neurons were located in any edited layer; lower beta")
    device = next(model.parameters()).device
    prepared = prepare(edit, config)
    group = prepared.group
    boundaries = answer_boundaries(model, tokenizer, group) if config.answer_boundary else None
    continuations = answer_continuations_many(model, tokenizer, [group], [boundaries], config.continuation_kl - 1
                                              )[0] if config.continuation_kl > 1 else None
    sampled = (prefixes or PrefixCache()).get(model, tokenizer, group.languages, config)
    batch = build_batch(tokenizer, prepared, sampled, config, device, boundaries, neighbours, continuations)
    neuron_index = {layer: neurons[layer].to(device) for layer in layers}
    deltas = {layer: torch.zeros(neuron_index[layer].numel(), device=device, requires_grad=True) for layer in layers}
    optimizer = torch.optim.Adam(list(deltas.values()), lr=config.learning_rate)
    rows = torch.cat([batch.target_rows, batch.kl_rows])
    positions = torch.cat([batch.target_positions - 1, batch.kl_positions])
    hits = hit_tensor(batch.subject_hits, device)
    result = OptimizationResult(deltas={})
    with eval_mode(model), ExitStack() as stack:
        base = _BaseRun(model, batch, layers)
        radius = {layer: config.clamp_norm_factor * float(base.value_norms[layer]) for layer in layers
                  } if config.clamp_norm_factor is not None else {}
        if config.upper_layer_shortcut and layers[0] > 0:
            stack.enter_context(upper_layers_only(model, layers[0], base.hidden_in))
        injection = stack.enter_context(ValueInjection(model, layers))
        bar = stack.enter_context(tqdm(total=config.steps, desc="LAFN dV", disable=not progress, leave=False))
        for step in range(config.steps + 1):
            injection.plan = {i: LayerPlan.build(hits, neuron_index[i], deltas[i]) for i in layers}
            logits = selected_logits(model, batch.input_ids, batch.attention_mask, rows, positions)
            totals, target_loss, penalty, fit = _losses(logits, batch, base, config)
            loss = config.lambda_target * target_loss + penalty
            loss_value, target_value = torch.stack([loss.detach(), fit.detach()]).tolist()  # one host sync
            result.loss_curve.append(loss_value)
            result.target_loss_curve.append(target_value)
            if step == config.steps or result.target_loss_curve[-1] < config.early_stop_loss:
                break
            # gradients for dV only: the shared model's parameters are neither written nor re-flagged
            grads = torch.autograd.grad(loss, [deltas[layer] for layer in layers])
            for layer, grad in zip(layers, grads):
                deltas[layer].grad = grad
            optimizer.step()
            _clamp(deltas, radius)
            bar.set_postfix(loss=f"{result.loss_curve[-1]:.3f}")
            bar.update()
        result.steps = step
        result.target_probabilities = {lang: float(torch.exp(-totals[i]).detach())
                                       for lang, i in batch.report_sequence.items()}
    result.deltas = {layer: deltas[layer].detach().float().cpu() for layer in layers}
    return result


@torch.no_grad()
def _clamp(deltas: dict[int, torch.Tensor], radius: dict[int, float]) -> None:
    """Project each layer's dV onto the ball of its radius (a radius <= 0: no clamp), on dV's device: no host sync."""
    for layer, limit in radius.items():
        if limit > 0:
            deltas[layer].mul_((limit / deltas[layer].norm()).clamp(max=1.0))
