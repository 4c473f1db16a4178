"""What ``edit()`` stores for routing, measured once per model and layer and then per entry: the routing key
(``keys``), the question scope (``scope``) and the neighbourhood prompts that keep dV off other relations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..bank.entries import KeySpace, QuestionScope, RoutingKey, ScopeSpace
from ..config import LafnConfig
from ..request import EditGroup
from .config import RoutingConfig
from .keys import calibrate_key_space, entry_key
from .matcher import SubjectMatcher
from .scope import calibrate_scope_space, entry_scope, neighbour_prompts


class EditRouting:
    """One model's key and scope spaces (measured on first use per layer) and the entries' keys and scopes."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._key_spaces: dict[int, tuple[KeySpace, torch.Tensor]] = {}  # layer -> (space, projected negatives)
        self._scope_spaces: dict[int, ScopeSpace] = {}

    def key(self, group: EditGroup, layers: Sequence[int], config: LafnConfig, routing: RoutingConfig,
            forms: Mapping[str, SubjectMatcher] | None = None) -> RoutingKey | None:
        """The group's representation key at the input of its first edited layer (``None`` when off); ``forms``:
        see ``entry_key``."""
        if not routing.representation:
            return None
        layer = min(layers)
        calibrated = self._key_spaces.get(layer)
        if calibrated is None:  # once per layer: a forward over the built-in negatives
            calibrated = self._key_spaces[layer] = calibrate_key_space(self._model, self._tokenizer, layer)
        return entry_key(self._model, self._tokenizer, group, calibrated[0], calibrated[1], routing,
                         config.num_paraphrases, forms)

    def scope_space(self, layer: int) -> ScopeSpace:
        space = self._scope_spaces.get(layer)
        if space is None:  # once per layer: a forward over the built-in relation prompts
            space = self._scope_spaces[layer] = calibrate_scope_space(self._model, self._tokenizer, layer)
        return space

    def scope(self, group: EditGroup, layers: Sequence[int], config: LafnConfig, routing: RoutingConfig,
              always: bool = False) -> QuestionScope | None:
        """The group's question scope at the input of its first edited layer (``None`` when off, unless
        ``always``)."""
        if not (routing.scope or always):
            return None
        return entry_scope(self._model, self._tokenizer, group, self.scope_space(min(layers)), routing.scope_margin,
                           config.num_paraphrases)

    def neighbours(self, group: EditGroup, layers: Sequence[int], config: LafnConfig, routing: RoutingConfig,
                   scope: QuestionScope | None) -> dict[str, list[str]] | None:
        """``LafnConfig.neighbour_kl`` KL prompts per language: other relations than the scope's own."""
        if not config.neighbour_kl:
            return None
        scope = scope or self.scope(group, layers, config, routing, always=True)
        relation = scope.relation if scope is not None else -1
        return neighbour_prompts(group, relation, config.neighbour_kl, config.seed)
