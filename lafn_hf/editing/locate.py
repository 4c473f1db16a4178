"""Locate language-agnostic factual neurons (paper section 2.2, Eq. 3-5).

Eq. 3: n_j^i = sum_{c in C_l} sum_t 1(act_fn(h~_{c,t}^i W_1^i)_j > 0)   (count over every token)
Eq. 4: D_l^i = { j | n_j^i / max(N^i) > beta }
Eq. 5: D^i = D_{l_1}^i  intersect ... intersect  D_{l_L}^i
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lafn_hf.modeling import decoder_layers, mlp_parts

from ..config import LafnConfig
from ..hooks import ForwardScope
from ..request import EditGroup
from ..tokens import encode_texts, sample_top_k


class _StopForward(Exception):
    """Raised by a hook once the last needed layer has run (the rest of the model is skipped)."""


@torch.no_grad()
def count_activations(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], layers: Sequence[int], batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Eq. 3: per layer, how often each neuron's ``act_fn(gate_proj(h)) > 0`` over all tokens.

    Padding positions are excluded; layers above ``max(layers)`` are not computed.
    Returns layer -> (intermediate_size,) int64 counts.
    """
    if not texts:
        raise ValueError("count_activations needs at least one text")
    modules = decoder_layers(model)
    counts: dict[int, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    last = max(layers)

    def hook_for(layer: int, act_fn: nn.Module) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            fired = (act_fn(output) > 0) & mask_holder["mask"][..., None]  # (B, T, I)
            total = fired.sum(dim=(0, 1), dtype=torch.int64).cpu()
            counts[layer] = counts[layer] + total if layer in counts else total
            if layer == last:
                raise _StopForward

        return hook

    device = next(model.parameters()).device
    with ForwardScope() as scope:  # the hooks see (and stop) only this thread's forwards
        for layer in layers:
            parts = mlp_parts(modules[layer])
            scope.forward_hook(parts.gate_proj, hook_for(layer, parts.act_fn))
        for start in range(0, len(texts), batch_size):
            input_ids, attention_mask = encode_texts(tokenizer, texts[start : start + batch_size], device)
            mask_holder["mask"] = attention_mask.bool()
            with suppress(_StopForward):
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return counts


def select_frequent(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 4: indices j with counts[j] / max(counts) > beta (sorted int64; empty if nothing fired)."""
    peak = int(counts.max()) if counts.numel() else 0
    if peak == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.nonzero(counts.double() / peak > beta).flatten().to(torch.int64)


def intersect(index_sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 5: sorted indices present in every set."""
    result = index_sets[0]
    for other in index_sets[1:]:
        result = result[torch.isin(result, other)]
    return result.sort().values


@dataclass(frozen=True)
class LocatedNeurons:
    """Per language and layer the factual neurons D_l^i, and their intersection D^i per layer."""

    per_language: dict[str, dict[int, torch.Tensor]]
    shared: dict[int, torch.Tensor]

    def counts(self) -> dict[str, dict[int, int]]:
        return {lang: {layer: int(idx.numel()) for layer, idx in by_layer.items()}
                for lang, by_layer in self.per_language.items()}

    def shared_counts(self) -> dict[int, int]:
        return {layer: int(idx.numel()) for layer, idx in self.shared.items()}


def locating_corpus(group: EditGroup, config: LafnConfig, language: str,
                    samples: Sequence[str] = ()) -> list[str]:
    """C_l: the prompt plus up to ``num_paraphrases`` paraphrases ("single" strategy: prompt only), then
    ``samples`` (the model's own continuations of the prompt, see ``sample_continuations``)."""
    edit = group.edits[language]
    if config.locate_strategy == "single":
        return [edit.prompt]
    return list(dict.fromkeys([edit.prompt, *edit.paraphrases[: config.num_paraphrases], *samples]))


@torch.no_grad()
def sample_continuations(model: nn.Module, tokenizer: Any, group: EditGroup, config: LafnConfig) -> dict[str, list[str]]:
    """Per language, ``config.locate_samples`` texts "prompt + the model's own sampled continuation"
    (``config.locate_sample_tokens`` tokens, top-k 5, seeded): a locating corpus that needs no chat model."""
    if config.locate_samples == 0 or config.locate_strategy != "paraphrases":
        return {lang: [] for lang in group.languages}
    device = next(model.parameters()).device
    prompts = [group.edits[lang].prompt for lang in group.languages]
    input_ids, attention_mask = encode_texts(tokenizer, prompts, device, left=True)
    output = sample_top_k(model, tokenizer, input_ids, attention_mask, config.seed, config.locate_sample_tokens,
                          per_row=config.locate_samples)
    new = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    per_prompt = config.locate_samples
    return {lang: [f"{prompts[i]}{text}" for text in new[i * per_prompt : (i + 1) * per_prompt] if text.strip()]
            for i, lang in enumerate(group.languages)}


def locate_neurons(
    model: nn.Module, tokenizer: Any, group: EditGroup, layers: Sequence[int], config: LafnConfig
) -> LocatedNeurons:
    """D_G per layer for ``config.locate_strategy`` (paper Table 4 ablation).

    ``paraphrases`` / ``single``: Eq. 3-5 on the locating corpus. ``all``: every neuron of the
    layers. ``random``: as many neurons per layer as ``paraphrases`` finds, drawn with ``config.seed``.
    """
    size = int(mlp_parts(decoder_layers(model)[layers[0]]).down_proj.in_features)  # type: ignore[arg-type]
    if config.locate_strategy == "all":
        everything = {layer: torch.arange(size, dtype=torch.int64) for layer in layers}
        return LocatedNeurons({lang: dict(everything) for lang in group.languages}, everything)
    samples = sample_continuations(model, tokenizer, group, config)
    per_language = {lang: _locate_language(model, tokenizer, locating_corpus(group, config, lang, samples[lang]),
                                           layers, config.beta)
                    for lang in group.languages}
    shared = {layer: intersect([per_language[lang][layer] for lang in group.languages]) for layer in layers}
    if config.locate_strategy == "random":
        generator = torch.Generator().manual_seed(config.seed)
        shared = {layer: torch.randperm(size, generator=generator)[: idx.numel()].sort().values
                  for layer, idx in shared.items()}
    return LocatedNeurons(per_language, shared)


def _locate_language(model: nn.Module, tokenizer: Any, corpus: Sequence[str], layers: Sequence[int],
                     beta: float) -> dict[int, torch.Tensor]:
    counts = count_activations(model, tokenizer, corpus, layers)
    return {layer: select_frequent(counts[layer], beta) for layer in layers}


def neuron_sets_by_language(
    model: nn.Module, tokenizer: Any, corpora: Mapping[str, Sequence[str]], layers: Sequence[int], beta: float
) -> LocatedNeurons:
    """Eq. 3-5 for arbitrary corpora (the analysis of section 2.2 / Figure 2)."""
    per_language = {lang: _locate_language(model, tokenizer, texts, layers, beta) for lang, texts in corpora.items()}
    languages = list(corpora)
    shared = {layer: intersect([per_language[lang][layer] for lang in languages]) for layer in layers}
    return LocatedNeurons(per_language, shared)
