"""Batched optimisation (issue: scale): B edit groups optimised in one forward per step, each with its own dV.

The groups' training sequences are packed into one right-padded batch (rows never interact: attention is
per row), each group's dV is added only at its own rows' subject tokens (per-row plans), and the loss is
the sum of the groups' own Eq. 9 losses, so each dV gets exactly the gradient it would get alone. Adam is
elementwise, so one optimiser over all dVs updates each as its own would. Every group stops on its own
(early stop or the step limit): from then on its dV is frozen, its result recorded and its rows leave the
batch (the batch is packed again from the groups still going). A group whose batch cannot be built is
reported as failed without stopping the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LafnConfig
from ..request import EditGroup
from ..tokens import pad_id
from ..values import LayerPlan, ValueInjection, hit_tensor
from .optimize import (
    OptimizationResult,
    PrefixCache,
    TrainingBatch,
    _BaseRun,
    _clamp,
    answer_boundaries,
    answer_boundaries_many,
    answer_continuations_many,
    build_batch,
    eval_mode,
    kl_penalty,
    selected_logits,
    sequence_losses,
    upper_layers_only,
)
from .prepared import PreparedEdit

logger = logging.getLogger(__name__)


@dataclass
class _Packed:
    """Several groups' ``TrainingBatch`` in one: ``*_group`` give the group of each hit, sequence, KL row."""

    batch: TrainingBatch
    hit_group: torch.Tensor  # (H,) group of each subject hit
    sequence_group: torch.Tensor  # (S,)
    kl_group: torch.Tensor  # (K,)
    report: list[dict[str, int]]  # per group: language -> its reported sequence (merged numbering)
    hits: list[list[tuple[int, int]]]  # per group: its (row, position) hits


def pack(batches: Sequence[TrainingBatch], padding_id: int) -> _Packed:
    """One batch of ``batches`` (each right-padded): rows, sequences and KL rows renumbered in order."""
    width = max(b.input_ids.shape[1] for b in batches)
    device = batches[0].input_ids.device

    def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    rows = sequences = 0
    hits, report = [], []
    endings: list[torch.Tensor] = []
    continuation: list[torch.Tensor] = []
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("rows", "positions", "ids", "sequence", "kl_rows",
                                                              "kl_positions", "hit_group", "sequence_group", "kl_group")}
    for g, b in enumerate(batches):
        hits.append([(r + rows, p) for r, p in b.subject_hits])
        report.append({lang: s + sequences for lang, s in b.report_sequence.items()})
        parts["rows"].append(b.target_rows + rows)
        parts["positions"].append(b.target_positions)
        parts["ids"].append(b.target_ids)
        parts["sequence"].append(b.target_sequence + sequences)
        parts["kl_rows"].append(b.kl_rows + rows)
        parts["kl_positions"].append(b.kl_positions)
        parts["hit_group"].append(torch.full((len(b.subject_hits),), g, dtype=torch.long))
        parts["sequence_group"].append(torch.full((len(b.sequence_language),), g, dtype=torch.long))
        parts["kl_group"].append(torch.full((b.kl_rows.numel(),), g, dtype=torch.long))
        endings.append(b.ending if b.ending is not None else torch.zeros_like(b.target_ids, dtype=torch.bool))
        continuation.append(b.continuation if b.continuation is not None
                            else torch.zeros_like(b.kl_rows, dtype=torch.bool))
        rows += b.input_ids.shape[0]
        sequences += len(b.sequence_language)
    cat = {k: torch.cat(v).to(device) for k, v in parts.items()}
    batch = TrainingBatch(
        torch.cat([widen(b.input_ids, padding_id) for b in batches]),
        torch.cat([widen(b.attention_mask, 0) for b in batches]),
        [hit for group in hits for hit in group], cat["rows"], cat["positions"], cat["ids"], cat["sequence"],
        [lang for b in batches for lang in b.sequence_language], {}, cat["kl_rows"], cat["kl_positions"],
        next((b.continues_word for b in batches if b.continues_word is not None), None),
        torch.cat(endings).to(device) if any(b.ending is not None for b in batches) else None,
        torch.cat(continuation).to(device) if any(b.continuation is not None for b in batches) else None)
    return _Packed(batch, cat["hit_group"], cat["sequence_group"], cat["kl_group"], report, hits)


def optimize_updates(model: nn.Module, tokenizer: Any, groups: Sequence[EditGroup | PreparedEdit],
                     neurons: Sequence[dict[int, torch.Tensor]], config: LafnConfig,
                     prefixes: PrefixCache | None = None,
                     neighbours: Sequence[dict[str, list[str]] | None] | None = None,
                     ) -> list[OptimizationResult | Exception]:
    """``optimize_update`` for several groups at once (see the module docstring); per group its result or the
    error that kept it out (e.g. a target that produces no tokens); ``neighbours``: each group's KL prompts."""
    device = next(model.parameters()).device
    outcome: list[OptimizationResult | Exception] = [ValueError("not optimised")] * len(groups)
    members, batches = [], []
    prefixes = prefixes or PrefixCache()
    plain = [group.group if isinstance(group, PreparedEdit) else group for group in groups]
    located_any = [g for g, located in enumerate(neurons) if any(idx.numel() for idx in located.values())]
    endings = _answer_endings(model, tokenizer, [plain[g] for g in located_any]) if config.answer_boundary else []
    boundaries_of: dict[int, dict[str, str]] = dict(zip(located_any, endings))
    together = [g for g in located_any if g in boundaries_of or not config.answer_boundary]
    following = _continuations(model, tokenizer, [plain[g] for g in together],
                               [boundaries_of.get(g) for g in together], config)
    following_of: dict[int, dict[str, list[int]]] = dict(zip(together, following))
    for g, group in enumerate(groups):
        try:
            if g not in located_any:
                raise ValueError("no language-agnostic neurons were located in any edited layer; lower beta")
            boundaries = (boundaries_of.get(g) or answer_boundaries(model, tokenizer, plain[g])
                          ) if config.answer_boundary else None
            continuations = following_of[g] if g in following_of else _continuations(
                model, tokenizer, [plain[g]], [boundaries], config, alone=True)[0]
            sampled = prefixes.get(model, tokenizer, plain[g].languages, config)
            batches.append(build_batch(tokenizer, group, sampled, config, device, boundaries,
                                       neighbours[g] if neighbours is not None else None, continuations))
            members.append(g)
        except (ValueError, TypeError, RuntimeError) as error:
            outcome[g] = error
    if not members:
        return outcome
    for g, result in zip(members, _optimize_packed(model, tokenizer, batches, [neurons[g] for g in members], config)):
        outcome[g] = result
    return outcome


def _answer_endings(model: nn.Module, tokenizer: Any, groups: Sequence[EditGroup]) -> list[dict[str, str]]:
    """``answer_boundaries`` of all ``groups`` in one generate; [] when that fails (each group then asks alone,
    so an error stays with its group)."""
    try:
        return answer_boundaries_many(model, tokenizer, groups) if groups else []
    except (ValueError, TypeError, RuntimeError) as error:
        logger.warning("answer boundaries of %d groups together failed (%s); asking group by group", len(groups), error)
        return []


def _continuations(model: nn.Module, tokenizer: Any, groups: Sequence[EditGroup],
                   boundaries: Sequence[dict[str, str] | None], config: LafnConfig,
                   alone: bool = False) -> list[dict[str, list[int]]]:
    """``answer_continuations_many`` of ``groups`` when ``continuation_kl`` reads more than the answer's next
    token ({} each otherwise); [] when that fails together (each group then asks alone, ``alone``: and its error
    stays with it)."""
    if config.continuation_kl <= 1 or not groups:
        return [{} for _ in groups]
    try:
        return answer_continuations_many(model, tokenizer, groups, boundaries, config.continuation_kl - 1)
    except (ValueError, TypeError, RuntimeError) as error:
        if alone:
            raise
        logger.warning("answer continuations of %d groups together failed (%s); asking group by group",
                       len(groups), error)
        return []


def _optimize_packed(model: nn.Module, tokenizer: Any, batches: list[TrainingBatch],
                     neurons: list[dict[int, torch.Tensor]], config: LafnConfig) -> list[OptimizationResult]:
    count = len(batches)
    device = next(model.parameters()).device
    padding = pad_id(tokenizer)
    layer_sets = [sorted(layer for layer, idx in located.items() if idx.numel()) for located in neurons]
    layers = sorted({layer for group_layers in layer_sets for layer in group_layers})
    index = [{layer: located[layer].to(device) for layer in group_layers}
             for located, group_layers in zip(neurons, layer_sets)]
    deltas = [{layer: torch.zeros(idx[layer].numel(), device=device, requires_grad=True) for layer in idx}
              for idx in index]
    optimizer = torch.optim.Adam([d for group in deltas for d in group.values()], lr=config.learning_rate)
    results = [OptimizationResult(deltas={}) for _ in range(count)]
    with eval_mode(model), ExitStack() as stack:
        full = pack(batches, padding)
        base = _BaseRun(model, full.batch, layers)
        hidden_of, kl_of = _split(batches, base.hidden_in, base.kl_log_probs)
        hits = torch.zeros(count).index_add(0, full.hit_group.cpu(), torch.ones(full.hit_group.numel()))
        norms = {layer: torch.zeros(count).index_add(0, full.hit_group.cpu(), per_hit.cpu()) / hits.clamp_min(1)
                 for layer, per_hit in base.hit_value_norms.items()}  # mean ||V|| at each group's hits
        radius = [{layer: config.clamp_norm_factor * float(norms[layer][g]) for layer in deltas[g]}
                  if config.clamp_norm_factor is not None else {} for g in range(count)]
        injection = stack.enter_context(ValueInjection(model, layers))
        shortcut = stack.enter_context(ExitStack())
        active: list[int] = []
        for step in range(config.steps + 1):
            still = [g for g in range(count) if not results[g].target_probabilities]
            if still != active:  # finished groups leave the batch: only active rows are computed
                active = still
                packed = pack([batches[g] for g in active], padding)
                batch, width = packed.batch, packed.batch.input_ids.shape[1]
                rows = torch.cat([batch.target_rows, batch.kl_rows])
                positions = torch.cat([batch.target_positions - 1, batch.kl_positions])
                kl_active = torch.cat([kl_of[g] for g in active])
                where = [hit_tensor(packed.hits[a], device) for a in range(len(active))]
                shortcut.close()
                if config.upper_layer_shortcut and layers[0] > 0:
                    hidden = torch.cat([hidden_of[g][:, :width] for g in active])
                    shortcut.enter_context(upper_layers_only(model, layers[0], hidden))
            injection.plan = {layer: LayerPlan.concat([LayerPlan.build(where[a], index[g][layer], deltas[g][layer])
                                                       for a, g in enumerate(active) if layer in deltas[g]])
                              for layer in layers if any(layer in deltas[g] for g in active)}
            logits = selected_logits(model, batch.input_ids, batch.attention_mask, rows, positions)
            totals, target_loss, penalty, fit = _group_losses(logits, packed, kl_active, len(active), config)
            losses = config.lambda_target * target_loss + penalty
            loss_values, target_values = torch.stack([losses.detach(), fit.detach()]).tolist()  # one sync
            going = []
            for a, g in enumerate(active):
                results[g].loss_curve.append(loss_values[a])
                results[g].target_loss_curve.append(target_values[a])
                if step == config.steps or results[g].target_loss_curve[-1] < config.early_stop_loss:
                    results[g].steps = step
                    results[g].target_probabilities = {lang: float(torch.exp(-totals[s]).detach())
                                                       for lang, s in packed.report[a].items()}
                    for delta in deltas[g].values():  # frozen from now on: Adam skips parameters without a gradient
                        delta.grad = None
                else:
                    going.append(a)
            if not going:
                break
            params = [deltas[active[a]][layer] for a in going for layer in deltas[active[a]]]
            objective = losses.sum() if len(going) == len(active) else losses[going].sum()  # no index copy: no sync
            grads = torch.autograd.grad(objective, params)
            for param, grad in zip(params, grads):
                param.grad = grad
            optimizer.step()
            for a in going:
                _clamp(deltas[active[a]], radius[active[a]])
    for g in range(count):
        results[g].deltas = {layer: delta.detach().float().cpu() for layer, delta in deltas[g].items()}
    return results


def _split(batches: Sequence[TrainingBatch], hidden_in: torch.Tensor,
           kl_base: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per group, its rows of the base run's hidden input and its KL rows' base log-probs."""
    hidden, kl = [], []
    row = klrow = 0
    for b in batches:
        hidden.append(hidden_in[row : row + b.input_ids.shape[0]])
        kl.append(kl_base[klrow : klrow + b.kl_rows.numel()])
        row += b.input_ids.shape[0]
        klrow += b.kl_rows.numel()
    return hidden, kl


def _group_losses(logits: torch.Tensor, packed: _Packed, kl_base: torch.Tensor, groups: int,
                  config: LafnConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL per sequence, per group L_target (G,), per group weighted KL terms (G,), per group fit (G,)),
    as ``optimize._losses`` per group (``early_stop_on="worst"``: the fit is the group's worst sequence)."""
    worst = config.early_stop_on == "worst"
    batch = packed.batch
    total, sequence_nll, edited, fit = sequence_losses(logits, batch)
    sequences = len(batch.sequence_language)
    device = logits.device
    per_sequence = torch.zeros(groups, device=device).index_add(
        0, packed.sequence_group, torch.ones(sequences, device=device))

    def group_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(groups, device=device).index_add(0, packed.sequence_group, values) / per_sequence

    kl_each = (kl_base.exp() * (kl_base - edited)).sum(-1)
    penalty = kl_penalty(kl_each, batch.continuation, packed.kl_group, groups, config)
    group_fit = torch.zeros(groups, device=device).scatter_reduce(
        0, packed.sequence_group, fit, "amax", include_self=False) if worst else group_mean(fit)
    return total, group_mean(sequence_nll), penalty, group_fit
