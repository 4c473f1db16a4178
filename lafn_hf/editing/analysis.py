"""Neuron analysis of paper section 2.2: factual neurons per layer and language (Figure 2) and the
difference between located sets (Figure 4). Plots need the ``plot`` extra (matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lafn_hf.modeling import decoder_layers

from .locate import LocatedNeurons, neuron_sets_by_language

SHARED = "shared"


def count_factual_neurons(model: nn.Module, tokenizer: Any, corpora: Mapping[str, Sequence[str]], beta: float,
                          layers: Sequence[int] | None = None) -> dict[str, dict[int, int]]:
    """Eq. 3-5 over whole corpora: per language and for their intersection (key ``"shared"``),
    layer -> number of factual neurons."""
    if not corpora or any(not texts for texts in corpora.values()):
        raise ValueError("corpora must map each language to a non-empty list of texts")
    if SHARED in corpora:
        raise ValueError(f"{SHARED!r} is reserved for the intersection; rename that language")
    layers = list(layers) if layers is not None else list(range(len(decoder_layers(model))))
    located: LocatedNeurons = neuron_sets_by_language(model, tokenizer, corpora, layers, beta)
    counts = located.counts()
    counts[SHARED] = located.shared_counts()
    return counts


def neuron_set_difference(sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """dif(A, B) = 1 - (|A n B| / |A| + |A n B| / |B|) / 2 for every pair (0 on the diagonal)."""
    size = len(sets)
    result = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            a, b = sets[i], sets[j]
            if a.numel() == 0 or b.numel() == 0:
                result[i, j] = 0.0 if a.numel() == b.numel() else 1.0
                continue
            common = int(torch.isin(a, b).sum())
            result[i, j] = 1 - (common / a.numel() + common / b.numel()) / 2
    return result


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'lafn-hf[plot]'") from error
    return plt


def plot_neuron_counts(counts: Mapping[str, Mapping[int, int]], path: str | os.PathLike[str],
                       title: str = "Factual neurons per layer") -> None:
    """A line per language plus the shared (language-agnostic) neurons, like the paper's Figure 2."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4), dpi=100)
    for name, by_layer in counts.items():
        layers = sorted(by_layer)
        axis.plot(layers, [by_layer[i] for i in layers], marker="o", label=name,
                  linewidth=2.5 if name == SHARED else 1.5)
    axis.set_xlabel("layer")
    axis.set_ylabel("neurons")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_difference_heatmap(matrix: torch.Tensor, labels: Sequence[str], path: str | os.PathLike[str]) -> None:
    """The pairwise difference matrix as a heatmap, like the paper's Figure 4."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 5), dpi=100)
    image = axis.imshow(matrix.numpy(), cmap="Blues_r", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(labels)), labels, rotation=90)
    axis.set_yticks(range(len(labels)), labels)
    figure.colorbar(image, ax=axis, label="dif")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
