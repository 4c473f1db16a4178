"""Checks made before an edit does any work: sequences that cannot fit the model, slow dtypes on the CPU."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lafn_hf.modeling import text_config

from .config import EditGroup, LafnConfig
from .tokens import target_separator

logger = logging.getLogger(__name__)


def _context_limit(model: nn.Module, tokenizer: Any) -> tuple[int, str] | None:
    """(positions the model handles, where that number comes from), or None when neither says."""
    limits = []
    positions = getattr(text_config(model.config), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, "max_position_embeddings"))
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < 10**9:  # unset: transformers uses int(1e30)
        limits.append((length, "the tokenizer's model_max_length"))
    return min(limits) if limits else None


def check_context(model: nn.Module, tokenizer: Any, group: EditGroup, config: LafnConfig) -> None:
    """Refuse, before any work, an edit whose training or locating sequences exceed the model's positions."""
    found = _context_limit(model, tokenizer)
    if found is None:
        return
    limit, source = found
    prefix = config.prefix_length if config.num_prefixes else 0
    for lang, edit in group.edits.items():
        full = edit.prompt + target_separator(edit.prompt, edit.target) + edit.target
        length = len(tokenizer(full)["input_ids"]) + prefix
        if length > limit:
            what = f"the prompt, its target and a {prefix}-token prefix take" if prefix else "the prompt and its target take"
            raise ValueError(f"language {lang!r}: {what} {length} tokens; the model handles at most {limit} positions "
                             f"({source}). Shorten the prompt")
        for number, paraphrase in enumerate(edit.paraphrases[: config.num_paraphrases]):
            length = len(tokenizer(paraphrase)["input_ids"])
            if length > limit:
                raise ValueError(f"language {lang!r}: paraphrase {number} takes {length} tokens; the model handles "
                                 f"at most {limit} positions ({source})")


_SLOW_ON_CPU = (torch.bfloat16, torch.float16)


def warn_if_slow_dtype(model: nn.Module) -> None:
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cpu" and parameter.dtype in _SLOW_ON_CPU:
        logger.warning("editing a %s model on the CPU is ~20x slower than float32 (280 s against 13.5 s for "
                       "Gemma-3-270M); load it with dtype=torch.float32 (the lafn CLI does on CPU)", parameter.dtype)
