"""Checks made before an edit does any work: sequences that cannot fit the model, slow dtypes on the CPU."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lafn_hf.modeling import text_config

from ..config import LafnConfig
from ..request import EditGroup
from ..tokens import target_separator

logger = logging.getLogger(__name__)


def context_limit(model: nn.Module, tokenizer: Any) -> tuple[int, str] | None:
    """(positions the model handles, where that number comes from), or None when neither says."""
    limits = []
    config = getattr(model, "config", None)
    positions = getattr(text_config(config), "max_position_embeddings", None) if config is not None else None
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, "max_position_embeddings"))
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < 10**9:  # unset: transformers uses int(1e30)
        limits.append((length, "the tokenizer's model_max_length"))
    return min(limits) if limits else None


def answered_length(tokenizer: Any, context: str, target: str) -> int:
    """Tokens of ``context`` followed by ``target`` as a training row writes them."""
    return len(tokenizer(context + target_separator(context, target) + target)["input_ids"])


def check_context(model: nn.Module, tokenizer: Any, group: EditGroup, config: LafnConfig) -> None:
    """Refuse, before any work, an edit whose training or locating sequences exceed the model's positions:
    the prompt with its target and a prefix, each located paraphrase, each trained paraphrase with its target."""
    found = context_limit(model, tokenizer)
    if found is None:
        return
    limit, source = found
    prefix = config.prefix_length if config.num_prefixes else 0
    for lang, edit in group.edits.items():
        length = answered_length(tokenizer, edit.prompt, edit.target) + prefix
        if length > limit:
            what = f"the prompt, its target and a {prefix}-token prefix take" if prefix else "the prompt and its target take"
            raise ValueError(f"language {lang!r}: {what} {length} tokens; the model handles at most {limit} positions "
                             f"({source}). Shorten the prompt")
        used = edit.paraphrases[: max(config.num_paraphrases, config.train_paraphrases)]
        for number, paraphrase in enumerate(used):
            trained = number < config.train_paraphrases
            length = (answered_length(tokenizer, paraphrase, edit.target) if trained
                      else len(tokenizer(paraphrase)["input_ids"]))
            if length > limit:
                what = f"paraphrase {number} and its target take" if trained else f"paraphrase {number} takes"
                raise ValueError(f"language {lang!r}: {what} {length} tokens; the model handles at most {limit} "
                                 f"positions ({source})")


_SLOW_ON_CPU = (torch.bfloat16, torch.float16)


def warn_if_slow_dtype(model: nn.Module) -> None:
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cpu" and parameter.dtype in _SLOW_ON_CPU:
        logger.warning("editing a %s model on the CPU is ~20x slower than float32 (280 s against 13.5 s for "
                       "Gemma-3-270M); load it with dtype=torch.float32 (the lafn CLI does on CPU)", parameter.dtype)
