"""``EditableCausalLM``: a Hugging Face causal LM plus an LAFN edit bank.

The wrapper behaves as the wrapped model (``forward``, ``generate``, ``pipeline``, attribute
passthrough) while a ``BankInjector`` applies the bank's dV at matched subjects. The base
weights are never modified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lafn_hf.modeling import decoder_layers, default_edit_layers, get_spec, mlp_parts

from .bank.base_model import BaseModelRef, parse_base_model
from .bank.checks import ValueRange
from .bank.entries import _ENTRY_ID, BankEntry, BankLimits, EditBank
from .bank.hub import is_bank_dir, push_bank, resolve_bank_dir
from .bank.store import load_bank, save_bank
from .config import LafnConfig
from .editing.optimize import OptimizationResult, PrefixCache, optimize_update
from .editing.optimize_many import optimize_updates
from .editing.pipeline import ReadyEdit, new_entry, ready_edit
from .editing.preflight import warn_if_slow_dtype
from .editing.results import EditManyResult, EditResult
from .editing.subject_span import resolve_group
from .request import EditGroup, surface_form_problem
from .routing.calibration import EditRouting
from .routing.config import RoutingConfig
from .routing.keys import separate
from .runtime.inject import BankInjector, bank_disabled
from .text import check_aliases

logger = logging.getLogger(__name__)

#: Metadata keys edit() writes into each entry itself; a caller's metadata may not use them.
_RESERVED_METADATA = frozenset({"prompts", "targets", "config", "target_probabilities", "written_paraphrases",
                                "subject_spans"})


def _show_progress(progress: bool | None) -> bool:
    """``None``: show progress bars when stderr is a terminal (as tqdm's ``disable=None``)."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class EditableCausalLM(nn.Module):
    """Wraps a LLaMA/Qwen/Mistral/Gemma causal LM and applies an ``EditBank`` at inference.

    Example::

        model = EditableCausalLM.from_pretrained("path/to/base")
        model.edit(EditGroup.from_dict({...}))
        model.generate(**model.tokenizer("The capital of ...", return_tensors="pt"))
    """

    def __init__(self, model: nn.Module, tokenizer: Any, bank: EditBank | None = None,
                 config: LafnConfig | None = None, base_revision: str | None = None,
                 routing: RoutingConfig | None = None) -> None:
        super().__init__()
        self._edit_lock = threading.Lock()
        self._prefixes = PrefixCache()  # the random prefixes of Eq. 7, shared by this model's edits
        if routing is not None and not isinstance(routing, RoutingConfig):
            raise TypeError(f"routing must be a RoutingConfig, got {type(routing).__name__}")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"a fast (Rust) tokenizer is required for offset mapping, got {type(tokenizer).__name__}")
        get_spec(model.config)
        layers = decoder_layers(model)
        mlp_parts(layers[0])
        self.model = model
        self.tokenizer = tokenizer
        self.lafn_config = config or LafnConfig()
        self.base_ref = BaseModelRef.from_model(model, base_revision)
        self._limits = BankLimits(self.base_ref.num_hidden_layers, self.base_ref.intermediate_size,
                                  self.base_ref.hidden_size)
        self._value_range = ValueRange(model)
        bank = bank if bank is not None else EditBank()
        self._check_entries(list(bank))
        self._injector = BankInjector(model, tokenizer, bank, routing)
        self._injector.guard = self._value_range.ensure  # a model cast after its bank was set: checked again
        self._edit_routing = EditRouting(model, tokenizer)  # key and scope spaces, measured on first use
        self._injector.attach()
        bank.limits = self._limits  # later ``bank.add`` calls are checked too
        self._compile()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], tokenizer: Any = None, *,
                        revision: str | None = None, token: str | None = None, config: LafnConfig | None = None,
                        base_model: str | None = None, routing: RoutingConfig | None = None,
                        allow_common: bool = False, **hf_kwargs: Any) -> EditableCausalLM:
        """Load a base model (path or Hub id), or an edit bank together with the base model it names.

        ``base_model`` (``"org/name"``, ``"org/name@revision"`` or a local directory) loads a bank onto that
        base model instead of the one the bank names; the shapes must still match. ``hf_kwargs`` go to
        ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``). Without ``dtype`` or ``device_map``, a
        machine without CUDA loads float32 (half-precision matmuls are ~20x slower on CPU) and a CUDA machine
        the checkpoint's dtype. ``allow_common`` accepts a bank's short and function-word subjects and aliases
        (``lafn_hf.bank.hub.load_bank``).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import load_dtype

        if not {"dtype", "torch_dtype", "device_map"} & set(hf_kwargs):
            hf_kwargs["dtype"] = load_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")

        bank: EditBank | None = None
        ref: BaseModelRef | None = None
        base_path, base_revision = str(name_or_path), revision
        bank_dir = _find_bank(name_or_path, revision, token)
        if bank_dir is None and base_model is not None:
            raise ValueError(f"base_model= only applies when loading an edit bank; {name_or_path} is not one")
        if bank_dir is not None:
            bank, ref = load_bank(bank_dir, allow_common=allow_common)
            if base_model is not None:
                base_path, base_revision = parse_base_model(base_model)
            elif not ref.name_or_path:
                raise ValueError(f"the bank at {name_or_path} does not name its base model; pass base_model=")
            elif not ref.is_hub_id and not os.path.isdir(ref.name_or_path):
                raise ValueError(f"the bank at {name_or_path} was made for the local base model {ref.name_or_path}, "
                                 "which does not exist here; pass base_model='org/name' (or a local directory)")
            else:
                base_path, base_revision = ref.name_or_path, ref.revision
        model = AutoModelForCausalLM.from_pretrained(base_path, revision=base_revision, token=token, **hf_kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(base_path, revision=base_revision, token=token)
        editable = cls(model, tokenizer, config=config, base_revision=base_revision, routing=routing)
        if bank is not None and ref is not None:
            ref.check_compatible(editable.base_ref)
            editable.set_bank(bank)
        return editable

    # -- the bank -----------------------------------------------------------------------------
    @property
    def bank(self) -> EditBank:
        return self._injector.bank

    @property
    def routing(self) -> RoutingConfig:
        """Which routing stages run (``lafn_hf.routing``); assign a new ``RoutingConfig`` to change them."""
        return self._injector.routing

    @routing.setter
    def routing(self, routing: RoutingConfig) -> None:
        if not isinstance(routing, RoutingConfig):
            raise TypeError(f"routing must be a RoutingConfig, got {type(routing).__name__}")
        self._injector.routing = routing
        self._compile()

    def add_aliases(self, entry_id: str, aliases: Sequence[str], allow_common: bool = False) -> BankEntry:
        """Give entry ``entry_id`` more surface forms that route to it, in any language; returns the updated
        entry. Forms too short, or one of any listed language's most frequent function words, raise
        ``ValueError`` (nothing changes) unless ``allow_common``."""
        entry = self.bank.get(entry_id)
        added = check_aliases(list(aliases), f"entry {entry_id!r}")
        for alias in added if not allow_common else ():
            problem = surface_form_problem(alias, None)
            if problem:
                raise ValueError(f"alias {alias!r} is refused: {problem}; pass allow_common=True to add it anyway")
        updated = dataclasses.replace(entry, aliases=tuple(dict.fromkeys([*entry.aliases, *added])))
        self.bank.replace(updated)
        return updated

    def set_key_threshold(self, entry_id: str, threshold: float) -> BankEntry:
        """Override the representation threshold (a cosine) of one entry's routing key; returns the entry."""
        entry = self.bank.get(entry_id)
        if entry.key is None:
            raise ValueError(f"entry {entry_id!r} has no routing key (made with RoutingConfig(representation=False)?)")
        updated = dataclasses.replace(entry, key=dataclasses.replace(entry.key, threshold=threshold))
        self.bank.replace(updated)
        return updated

    def set_scope_margin(self, entry_id: str, margin: float) -> BankEntry:
        """Override the margin of one entry's question scope (lower: more questions in scope; stored with the
        bank); returns the entry."""
        entry = self.bank.get(entry_id)
        if entry.scope is None:
            raise ValueError(f"entry {entry_id!r} has no question scope (made with RoutingConfig(scope=False), or "
                             "before scopes)")
        updated = dataclasses.replace(entry, scope=dataclasses.replace(entry.scope, margin=margin))
        self.bank.replace(updated)
        return updated

    def set_bank(self, bank: EditBank) -> None:
        """Use ``bank``: its entries, and those added to it later, must fit this model's layers, intermediate
        and hidden sizes and dtype (``ValueError`` naming the entry; nothing changes)."""
        self._check_entries(list(bank))
        bank.limits = self._limits
        self._injector.bank = bank
        self._compile()

    def _compile(self) -> None:
        """Build the bank's matcher and device tensors now (for the device forwards read their input on), not
        at the next forward: a server's requests then never wait for a bank being set."""
        get_embeddings = getattr(self.model, "get_input_embeddings", None)
        weight = getattr(get_embeddings() if callable(get_embeddings) else None, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            self._injector.compiled(weight.device)

    def load_bank(self, name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                  token: str | None = None, merge: bool = False, allow_common: bool = False) -> EditBank:
        """Load a bank (dir or Hub id) checked against this model; ``merge`` adds it to the current one;
        ``allow_common`` as in ``lafn_hf.bank.hub.load_bank``."""
        bank, ref = load_bank(resolve_bank_dir(name_or_path, revision, token), allow_common=allow_common)
        ref.check_compatible(self.base_ref)
        self.set_bank(self.bank.merge(bank) if merge else bank)
        return self.bank

    def add_entry(self, entry: BankEntry) -> str:
        """Add an entry to the bank (``ValueError`` if it does not fit this model); returns its id."""
        self._check_entry(entry)
        return self.bank.add(entry)

    def remove_edit(self, entry_id: str) -> BankEntry:
        """Roll back one edit."""
        return self.bank.remove(entry_id)

    def _check_entry(self, entry: BankEntry) -> None:
        self._check_entries([entry])

    def _check_entries(self, entries: list[BankEntry]) -> None:
        for entry in entries:
            if not isinstance(entry, BankEntry):
                raise TypeError(f"expected a BankEntry, got {type(entry).__name__}")
            self._limits.check(entry)
        self._value_range.check(entries)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """A cast (``.half()``, ``.to(torch.float16)``, ...) first checks the bank against the new dtype
        (``ValueError`` naming the entry; nothing is cast)."""
        current = self._value_range.dtype()
        try:
            target = fn(torch.empty(0, dtype=current)).dtype if current is not None else None
        except Exception:  # not a conversion a tensor shows: the next forward checks (``ValueRange.ensure``)
            target = current
        if target != current:
            self._value_range.check(list(self.bank), target)
        return super()._apply(fn, recurse)

    def save_pretrained(self, directory: str | os.PathLike[str], *, base_model: str | None = None) -> None:
        """Write the bank (not the base weights) crash-safely; see ``lafn_hf.bank.hub``.

        ``base_model`` (``"org/name"`` or ``"org/name@revision"``) is recorded as the base model instead of
        the one this model was loaded from (its Hub id when known, else its local path).
        """
        base = self.base_ref if base_model is None else self.base_ref.with_base_model(base_model)
        save_bank(directory, self.bank, base)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str | None = None,
                    base_model: str | None = None) -> str:
        """Upload the bank to ``repo_id`` (``base_model`` as in ``save_pretrained``); warns when the recorded
        base model is a local path, which others cannot load. Returns the commit URL."""
        base = self.base_ref if base_model is None else self.base_ref.with_base_model(base_model)
        return push_bank(repo_id, self.bank, base, private=private, token=token, revision=revision,
                         commit_message=commit_message)

    # -- editing ------------------------------------------------------------------------------
    def edit_layers(self, config: LafnConfig | None = None) -> tuple[int, ...]:
        config = config or self.lafn_config
        layers = config.layers if config.layers is not None else default_edit_layers(self.model.config)
        if max(layers) >= self.base_ref.num_hidden_layers:
            raise ValueError(f"layers {list(layers)} out of range for {self.base_ref.num_hidden_layers} layers")
        return tuple(layers)

    def edit(self, group: EditGroup, config: LafnConfig | None = None, progress: bool | None = None,
             metadata: dict[str, Any] | None = None, entry_id: str | None = None) -> EditResult:
        """Locate D_G (Eq. 3-5), optimise dV (Eq. 6-9) against the base model, add one bank entry.

        ``progress`` shows a bar over the optimisation steps (default: when stderr is a terminal);
        ``metadata`` (JSON-serialisable) is stored with the entry beside the prompts, targets and config
        (its keys must differ from those edit() writes: prompts, targets, config, target_probabilities,
        written_paraphrases);
        ``entry_id`` names the new entry (default: a random ``edit-...`` id).
        A prompt that cannot fit the model's positions raises ``ValueError`` before any work; an edit whose
        final p(target) stays below ``config.min_target_probability`` in any language raises
        ``EditFailedError`` (a ``ValueError``) and stores nothing.
        """
        if not isinstance(group, EditGroup):
            raise TypeError(f"edit expects an EditGroup, got {type(group).__name__}")
        if entry_id is not None and (not isinstance(entry_id, str) or not _ENTRY_ID.match(entry_id)):
            raise ValueError(f"entry_id must match {_ENTRY_ID.pattern}, got {entry_id!r}")
        if entry_id is not None and entry_id in self.bank:
            raise ValueError(f"entry id {entry_id!r} is already in the bank")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        if reserved := sorted(_RESERVED_METADATA & set(metadata or {})):
            raise ValueError(f"metadata keys {reserved} are written by edit() itself; "
                             f"use other names (reserved: {sorted(_RESERVED_METADATA)})")
        config = config or self.lafn_config
        layers = self.edit_layers(config)
        group, spans = resolve_group(group, config.subject_search, config.alignment_threshold)
        warn_if_slow_dtype(self.model)
        started = time.perf_counter()
        with self._edit_lock, self.edits_disabled():  # edits of one model run one at a time; inference never waits
            ready = ready_edit(self.model, self.tokenizer, group, spans, config, layers, self.routing,
                               self._edit_routing, metadata)
            optimized = optimize_update(self.model, self.tokenizer, ready.prepared, ready.located.shared, config,
                                        _show_progress(progress), self._prefixes, ready.neighbours)
            # stored under the lock: a concurrent edit's key calibration sees this entry, and this one its own
            return self._store(ready, config, layers, optimized, entry_id, started)

    def _store(self, ready: ReadyEdit, config: LafnConfig, layers: tuple[int, ...], optimized: OptimizationResult,
               entry_id: str | None, started: float) -> EditResult:
        """Check that the edit took, then add its entry (its key calibrated against the bank's keys)."""
        key = self._edit_routing.key(ready.group, layers, config, self.routing, ready.prepared.forms)
        entry = new_entry(ready, config, optimized, key, entry_id)
        self._check_entry(entry)
        entry, raised = separate(self.bank, entry, self.routing.threshold_margin)
        for other in raised:  # keys of other subjects that the new key comes close to
            self.bank.replace(other)
        self.add_entry(entry)
        located = ready.located
        result = EditResult(entry.id, layers, located.counts(), located.shared_counts(), optimized.loss_curve,
                            optimized.target_loss_curve, optimized.target_probabilities, optimized.steps,
                            time.perf_counter() - started, dict(ready.group.subjects), ready.spans)
        logger.info("edit %s: %d steps, loss %.4f, p(target) %s", entry.id, result.steps, result.loss_curve[-1],
                    result.target_probabilities)
        return result

    def edit_many(self, groups: Sequence[EditGroup], config: LafnConfig | None = None,
                  progress: bool | None = None, batch_size: int = 1) -> EditManyResult:
        """Edit every group; a failing group (including an ``EditFailedError``) is recorded in ``failures``
        and the others go on. ``batch_size`` > 1 optimises that many groups in one forward per step, each
        with its own dV and its own early stop (``lafn_hf.editing.optimize_many``); results equal one-at-a-time edits
        up to float rounding. ``progress``: bars (default: when stderr is a terminal)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        outcome = EditManyResult()
        show = _show_progress(progress)
        bar = tqdm(total=len(groups), desc="LAFN edits", disable=not show)
        for first in range(0, len(groups), batch_size):
            chunk = list(enumerate(groups[first : first + batch_size], first))
            if batch_size == 1:
                results: list[EditResult | Exception] = [self._edit_or_error(chunk[0][1], config, show)]
            else:
                results = self._edit_batch([group for _, group in chunk], config or self.lafn_config)
            for (index, _), result in zip(chunk, results):
                if isinstance(result, EditResult):
                    outcome.results.append(result)
                else:
                    logger.warning("edit group %d failed: %s", index, result)
                    outcome.failures.append((index, f"{type(result).__name__}: {result}"))
            bar.update(len(chunk))
        bar.close()
        return outcome

    def _edit_or_error(self, group: EditGroup, config: LafnConfig | None, progress: bool) -> EditResult | Exception:
        try:
            return self.edit(group, config, progress=progress)
        except (ValueError, TypeError, RuntimeError) as error:
            return error

    def _edit_batch(self, groups: list[EditGroup], config: LafnConfig) -> list[EditResult | Exception]:
        """Ready each group, optimise them together, then store each (errors stay with their group)."""
        layers = self.edit_layers(config)
        warn_if_slow_dtype(self.model)
        started = time.perf_counter()
        outcome: list[EditResult | Exception] = []
        ready: list[tuple[int, ReadyEdit]] = []
        with self._edit_lock, self.edits_disabled():
            for position, group in enumerate(groups):
                outcome.append(ValueError("not edited"))
                try:
                    if not isinstance(group, EditGroup):
                        raise TypeError(f"edit expects an EditGroup, got {type(group).__name__}")
                    group, spans = resolve_group(group, config.subject_search, config.alignment_threshold)
                    ready.append((position, ready_edit(self.model, self.tokenizer, group, spans, config, layers,
                                                       self.routing, self._edit_routing, None)))
                except (ValueError, TypeError, RuntimeError) as error:
                    outcome[position] = error
            optimized = optimize_updates(self.model, self.tokenizer, [r.prepared for _, r in ready],
                                         [r.located.shared for _, r in ready], config, self._prefixes,
                                         [r.neighbours for _, r in ready])
            for (position, one), result in zip(ready, optimized):
                try:
                    if isinstance(result, Exception):
                        raise result
                    outcome[position] = self._store(one, config, layers, result, None, started)
                except (ValueError, TypeError, RuntimeError) as error:
                    outcome[position] = error
        return outcome

    # -- inference ----------------------------------------------------------------------------
    @contextmanager
    def edits_disabled(self) -> Iterator[None]:
        """Inside the block, this thread's (or asyncio task's) forwards run as the plain base model.

        Other threads calling the same model meanwhile keep their edits; no hook is added or removed.
        """
        with bank_disabled():
            yield

    def hook_handles(self) -> tuple[Any, ...]:
        """The hook handles this wrapper owns right now (for inspection and tests)."""
        return self._injector.handles()

    def unwrap(self) -> nn.Module:
        """Remove our hooks and return the plain base model."""
        self._injector.detach()
        return self.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    def __repr__(self) -> str:
        return f"EditableCausalLM({type(self.model).__name__}, {self.bank!r})"


def _find_bank(name_or_path: str | os.PathLike[str], revision: str | None, token: str | None) -> os.PathLike[str] | None:
    """The bank directory if ``name_or_path`` is a bank (local dir or Hub repo with lafn_config.json)."""
    if os.path.isdir(name_or_path):
        return name_or_path if is_bank_dir(name_or_path) else None  # type: ignore[return-value]
    from huggingface_hub import file_exists

    from .bank.lafn_config import BANK_CONFIG_NAME

    try:
        found = file_exists(str(name_or_path), BANK_CONFIG_NAME, revision=revision, token=token)
    except Exception as error:  # offline, gated, not a repo: treat as a base model id
        logger.debug("could not look for a bank at %s: %s", name_or_path, error)
        return None
    return resolve_bank_dir(name_or_path, revision, token) if found else None
