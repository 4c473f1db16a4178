"""One edit's steps before and after its optimisation, shared by ``edit()`` and batched ``edit_many``.

``ready_edit`` takes an ``EditGroup`` to everything its dV is optimised from: each language's subject span, the
context check, the paraphrases the model writes, the prepared edit, the located neurons, the question scope and
the KL neighbours. ``new_entry`` turns an optimised edit into its bank entry, or raises ``EditFailedError`` when
the edit did not take. ``EditableCausalLM`` (``lafn_hf.model``) runs them with the bank off, under its edit lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..bank.entries import BankEntry, LayerUpdate, QuestionScope, RoutingKey
from ..config import LafnConfig
from ..request import EditGroup
from ..routing.calibration import EditRouting
from ..routing.config import RoutingConfig
from .locate import LocatedNeurons, locate_neurons
from .optimize import OptimizationResult
from .preflight import check_context
from .prepared import PreparedEdit
from .results import EditFailedError
from .self_paraphrase import write_paraphrases
from .subject_span import SubjectSpan, spans_metadata


@dataclass(frozen=True)
class ReadyEdit:
    """An edit ready to optimise: what ``ready_edit`` found, in the order it found it."""

    prepared: PreparedEdit
    spans: dict[str, SubjectSpan]
    located: LocatedNeurons
    scope: QuestionScope | None
    neighbours: dict[str, list[str]] | None
    metadata: dict[str, Any] | None

    @property
    def group(self) -> EditGroup:
        return self.prepared.group


def with_written_paraphrases(model: nn.Module, tokenizer: Any, group: EditGroup, config: LafnConfig,
                             metadata: dict[str, Any] | None) -> tuple[EditGroup, dict[str, Any] | None]:
    """``group`` with the paraphrases the model writes (``LafnConfig.write_paraphrases``), and ``metadata``
    naming them under "written_paraphrases" (unchanged when none were written)."""
    written = write_paraphrases(model, tokenizer, group, config)
    new = {lang: list(edit.paraphrases) for lang, edit in written.edits.items()
           if edit.paraphrases != group.edits[lang].paraphrases}
    return written, ({**(metadata or {}), "written_paraphrases": new} if new else metadata)


def ready_edit(model: nn.Module, tokenizer: Any, group: EditGroup, spans: dict[str, SubjectSpan],
               config: LafnConfig, layers: tuple[int, ...], routing: RoutingConfig, edit_routing: EditRouting,
               metadata: dict[str, Any] | None) -> ReadyEdit:
    """Everything ``group`` (its subjects already resolved to ``spans``) is optimised from; run with the bank off."""
    check_context(model, tokenizer, group, config)
    group, metadata = with_written_paraphrases(model, tokenizer, group, config, metadata)
    prepared = PreparedEdit.build(group, config)
    located = locate_neurons(model, tokenizer, group, layers, config)
    scope = edit_routing.scope(group, layers, config, routing)
    neighbours = edit_routing.neighbours(group, layers, config, routing, scope)
    return ReadyEdit(prepared, spans, located, scope, neighbours, metadata)


def new_entry(ready: ReadyEdit, config: LafnConfig, optimized: OptimizationResult, key: RoutingKey | None,
              entry_id: str | None) -> BankEntry:
    """The bank entry of an optimised edit; ``EditFailedError`` (nothing to store) when any language's
    p(target) stayed below ``config.min_target_probability``."""
    probabilities = optimized.target_probabilities
    low = {lang: p for lang, p in probabilities.items() if not p >= config.min_target_probability}  # NaN too
    if low:
        shown = {lang: float(f"{p:.3g}") for lang, p in probabilities.items()}
        raise EditFailedError(
            f"the edit did not take: p(target) {shown} after {optimized.steps} steps; {sorted(low)} < "
            f"min_target_probability {config.min_target_probability}; nothing was stored. Check that the target "
            "is visible text the model can produce, try other layers or more steps, or lower "
            "LafnConfig.min_target_probability", probabilities, config.min_target_probability)
    group, located = ready.group, ready.located
    updates = {layer: LayerUpdate(located.shared[layer].clone(), delta) for layer, delta in optimized.deltas.items()}
    return BankEntry(
        subjects=group.subjects,
        updates=updates,
        metadata=_metadata(group, config, probabilities, ready.spans, ready.metadata),
        **({"id": entry_id} if entry_id is not None else {}),
        aliases=group.aliases,
        key=key,
        scope=ready.scope,
    )


def _metadata(group: EditGroup, config: LafnConfig, probabilities: Mapping[str, float],
              spans: dict[str, SubjectSpan], extra: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "prompts": {lang: e.prompt for lang, e in group.edits.items()},
        "targets": {lang: e.target for lang, e in group.edits.items()},
        "config": config.to_dict(),
        "target_probabilities": probabilities,
        **({"subject_spans": found} if (found := spans_metadata(spans)) else {}),
        **(extra or {}),
    }
