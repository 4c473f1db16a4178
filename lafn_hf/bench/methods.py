"""Editing methods behind one small interface, so that ``lafn bench`` runs them all the same way.

An ``EditMethod`` wraps one shared ``EditableCausalLM`` (its bank empty between items) and does three
things: ``apply(group)`` makes the edit and returns a ``Handle``, ``answer(prompts)`` answers questions
greedily through ``generate()``, ``rollback(handle)`` restores the unedited model exactly.

- ``LafnMethod``: ``model.edit(group, config)``; rollback removes the bank entry. ``LafnConfig.locate_strategy``
  selects Table 4's locating ablation (``paraphrases``, ``single``, ``all``, ``random``).
- ``UneditedMethod``: no edit; answers with the bank off.
- ``InContextMethod``: ReMaKE-like. While an edit is applied, every question in a language of the group is
  read as ``"<label> <edit prompt> <target><stop>\\n<question>"`` with the fact of that same language
  (label "New fact:" in English, translated for MzsRE's languages in ``FACT_LABELS``). There is no retriever:
  the fact is prepended to every question (``retrieval="always"``), unrelated ones too, an upper bound on
  its efficacy and a lower bound on its locality; ``retrieval="subject"`` prepends it only when a subject of
  the group occurs in the question (LAFN's matcher).
- ``LoraMethod``: peft LoRA (imported lazily, ``pip install peft``) on gate/up/down of LAFN's edit layers,
  trained on the edit prompts -> targets; rollback unloads the adapter (see ``LoraSettings``).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import LafnConfig
from ..evaluate import answer_ids, predict_batch
from ..model import EditableCausalLM
from ..request import EditGroup
from ..routing.matcher import SubjectMatcher
from ..text import is_spaceless_char
from ..tokens import target_separator

#: "New fact:" in the question's language (MzsRE's languages); others use English.
FACT_LABELS: dict[str, str] = {
    "en": "New fact:", "cs": "Nový fakt:", "de": "Neue Tatsache:", "es": "Nuevo hecho:", "fr": "Nouveau fait :",
    "nl": "Nieuw feit:", "pt": "Novo fato:", "ru": "Новый факт:", "th": "ข้อเท็จจริงใหม่:", "tr": "Yeni bilgi:",
    "vi": "Sự thật mới:", "zh": "新事实：",
}


@dataclass
class Handle:
    """What ``apply`` made: ``token`` is what ``rollback`` needs, ``info`` is recorded with the results."""

    method: str
    token: Any = None
    info: dict[str, Any] = field(default_factory=dict)


class EditMethod(ABC):
    """Edit a group, answer prompts, roll back. Subclasses set ``name`` and implement ``apply``/``rollback``."""

    name: ClassVar[str]

    def __init__(self, model: EditableCausalLM) -> None:
        self.model = model

    @abstractmethod
    def apply(self, group: EditGroup) -> Handle:
        """Make the edit; raise ``ValueError``/``RuntimeError`` when it cannot be made (nothing changed)."""

    @abstractmethod
    def rollback(self, handle: Handle) -> None:
        """Undo ``apply`` so that the model answers exactly as before it."""

    def settings(self) -> dict[str, Any]:
        """What this method's results depend on (keys the results file of ``lafn bench``)."""
        return {}

    def render(self, prompt: str, language: str | None) -> str:
        """The text the model reads for ``prompt`` (the prompt itself, except for in-context editing)."""
        return prompt

    def scope(self) -> Any:
        """Context manager the model runs in while answering (the bank off for ``UneditedMethod``)."""
        return nullcontext()

    def predict(self, prompt: str, language: str | None, mode: str = "generate", gold: Sequence[int] = (),
                max_new_tokens: int = 16) -> list[int]:
        """Answer tokens of ``prompt`` (see ``predict_ids``) as this method's model reads it."""
        return self.predict_many([prompt], [language], mode, [gold], [max_new_tokens])[0]

    def predict_many(self, prompts: Sequence[str], languages: Sequence[str | None], mode: str = "generate",
                     golds: Sequence[Sequence[int]] | None = None, budgets: Sequence[int] | None = None,
                     batch_size: int = 16) -> list[list[int]]:
        """``predict`` for several prompts, ``batch_size`` at a time in one left-padded ``generate()`` each."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        golds = golds if golds is not None else [()] * len(prompts)
        budgets = budgets if budgets is not None else [16] * len(prompts)
        if not (len(languages) == len(golds) == len(budgets) == len(prompts)):
            raise ValueError(f"got {len(prompts)} prompts, {len(languages)} languages, {len(golds)} golds and "
                             f"{len(budgets)} budgets")
        texts = [self.render(p, lang) for p, lang in zip(prompts, languages)]
        answers: list[list[int]] = []
        with self.scope():
            for start in range(0, len(texts), batch_size):
                chunk = slice(start, start + batch_size)
                answers += predict_batch(self.model, texts[chunk], mode, golds[chunk], budgets[chunk])
        return answers

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.model.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    def answer(self, prompts: Sequence[str], languages: Sequence[str] | None = None,
               max_new_tokens: int = 16) -> list[str]:
        """Greedy answers through ``generate()``, cut by ``answer_end``, stripped."""
        langs: Sequence[str | None] = languages if languages is not None else [None] * len(prompts)
        if len(langs) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(langs)} languages")
        return [self.decode(self.predict(p, lang, "generate", (), max_new_tokens)) for p, lang in zip(prompts, langs)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"


class UneditedMethod(EditMethod):
    """The base model: no edit, answers with the bank off."""

    name = "unedited"

    def apply(self, group: EditGroup) -> Handle:
        return Handle(self.name)

    def rollback(self, handle: Handle) -> None:
        return None

    def scope(self) -> Any:
        return self.model.edits_disabled()


class LafnMethod(EditMethod):
    """LAFN: ``model.edit(group, config)`` adds a bank entry; rollback removes it."""

    name = "lafn"

    def __init__(self, model: EditableCausalLM, config: LafnConfig | None = None) -> None:
        super().__init__(model)
        self.config = config or model.lafn_config

    def settings(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "layers": list(self.model.edit_layers(self.config)),
                "routing": dataclasses.asdict(self.model.routing)}

    def apply(self, group: EditGroup) -> Handle:
        result = self.model.edit(group, self.config, progress=False)
        info = {"steps": result.steps, "target_probabilities": result.target_probabilities,
                "shared_neurons": {str(k): v for k, v in result.shared_counts.items()}}
        return Handle(self.name, result.entry_id, info)

    def rollback(self, handle: Handle) -> None:
        if handle.token is not None:
            self.model.remove_edit(handle.token)


class InContextMethod(EditMethod):
    """ReMaKE-like in-context editing: the group's fact in the question's language is prepended."""

    name = "in-context"
    RETRIEVALS = ("always", "subject")

    def __init__(self, model: EditableCausalLM, retrieval: str = "always") -> None:
        super().__init__(model)
        if retrieval not in self.RETRIEVALS:
            raise ValueError(f"retrieval must be one of {self.RETRIEVALS}, got {retrieval!r}")
        self.retrieval = retrieval
        self._facts: dict[str, str] = {}
        self._matcher: SubjectMatcher | None = None

    def settings(self) -> dict[str, Any]:
        return {"retrieval": self.retrieval, "labels": FACT_LABELS, "format": "{label} {prompt} {target}{stop}\\n"}

    @staticmethod
    def fact_text(language: str, prompt: str, target: str) -> str:
        """``"New fact: <prompt> <target>."`` (label and full stop of ``language``; no space in CJK, Thai...)."""
        label = FACT_LABELS.get(language, FACT_LABELS["en"])
        spaceless = is_spaceless_char(target[-1]) or is_spaceless_char(prompt[-1])
        stop = "" if language == "th" else "。" if spaceless else "."
        gap = "" if label.endswith("：") else " "
        return f"{label}{gap}{prompt}{target_separator(prompt, target)}{target}{stop}\n"

    def apply(self, group: EditGroup) -> Handle:
        if self._facts:
            raise RuntimeError("in-context: an edit is already applied; roll it back first (single-edit protocol)")
        self._facts = {lang: self.fact_text(lang, e.prompt, e.target) for lang, e in group.edits.items()}
        self._matcher = SubjectMatcher(e.subject for e in group.edits.values())
        return Handle(self.name, token=sorted(self._facts))

    def rollback(self, handle: Handle) -> None:
        self._facts, self._matcher = {}, None

    def render(self, prompt: str, language: str | None) -> str:
        fact = self._facts.get(language or "")
        if fact is None:  # no fact in this language (not in the group): the question as it is
            return prompt
        if self.retrieval == "subject" and not (self._matcher and self._matcher.find(prompt)):
            return prompt
        return fact + prompt

    def scope(self) -> Any:
        return self.model.edits_disabled()


@dataclass(frozen=True)
class LoraSettings:
    """LoRA baseline hyper-parameters.

    Start: EasyEdit's LoRA editing settings (rank 8, alpha 32, no dropout, lr 5e-3, at most 70 Adam steps) with
    LAFN's stopping rule (stop once the mean target NLL over the group's prompts is below 0.05), so both methods
    train until the edit prompts give the target. On Gemma-3-270M (MzsRE dev items 0 and 6, en+zh) lr 5e-3
    reached the target in 3-5 steps but overshot: answers ran on into the target ("V Ravichandranavai...") and
    an unrelated answer changed; lr 1e-3 reached it in 8 steps with clean answers, hence 1e-3. ``layers=None``
    takes LAFN's edit layers for the model. Each result records the steps, the final NLL and whether it
    reached ``target_nll``.
    """

    rank: int = 8
    alpha: int = 32
    lr: float = 1e-3
    max_steps: int = 70
    target_nll: float = 0.05
    modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.max_steps < 0 or not self.lr > 0 or not self.modules:
            raise ValueError(f"LoRA settings out of range: {self}")


class LoraMethod(EditMethod):
    """peft LoRA on the edit layers' MLP projections, trained on the edit prompts; rollback unloads it."""

    name = "lora"

    def __init__(self, model: EditableCausalLM, settings: LoraSettings | None = None,
                 config: LafnConfig | None = None) -> None:
        super().__init__(model)
        try:
            import peft  # noqa: F401
        except ImportError as error:
            raise ImportError("the lora method needs peft: pip install peft") from error
        self.lora = settings or LoraSettings()
        self.layers = self.lora.layers or model.edit_layers(config)

    def settings(self) -> dict[str, Any]:
        data = dataclasses.asdict(self.lora)
        data.update(layers=list(self.layers), modules=list(self.lora.modules))
        return data

    def _nll(self, batches: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        losses = []
        for ids, answer_start in batches:
            logits = self.model.model(input_ids=ids).logits[0, answer_start - 1: -1].float()  # (T, V)
            losses.append(torch.nn.functional.cross_entropy(logits, ids[0, answer_start:]))
        return torch.stack(losses).mean()

    def apply(self, group: EditGroup) -> Handle:
        from peft import LoraConfig, get_peft_model

        hf_model = self.model.model
        trainable = {name: p.requires_grad for name, p in hf_model.named_parameters()}
        config = LoraConfig(r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=0.0, bias="none",
                            target_modules=list(self.lora.modules), layers_to_transform=list(self.layers))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.lora.seed)
            peft_model = get_peft_model(hf_model, config)
        handle = Handle(self.name, (peft_model, trainable))
        try:
            tokenizer = self.model.tokenizer
            batches = []
            for edit in group.edits.values():
                prompt = list(tokenizer(edit.prompt)["input_ids"])
                ids = prompt + answer_ids(tokenizer, edit.prompt, edit.target)
                batches.append((torch.tensor([ids], device=self.model.device), len(prompt)))
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(params, lr=self.lora.lr)
            steps, loss = 0, math.inf
            with self.model.edits_disabled():
                for steps in range(self.lora.max_steps + 1):  # noqa: B007
                    optimizer.zero_grad()
                    nll = self._nll(batches)
                    loss = float(nll.detach())
                    if loss < self.lora.target_nll or steps == self.lora.max_steps:
                        break
                    nll.backward()
                    optimizer.step()
            handle.info = {"steps": steps, "final_nll": loss, "reached": loss < self.lora.target_nll}
        except BaseException:
            self.rollback(handle)
            raise
        for p in params:
            p.requires_grad_(False)
        return handle

    def rollback(self, handle: Handle) -> None:
        if handle.token is None:
            return
        peft_model, trainable = handle.token
        handle.token = None
        base = peft_model.unload()  # LoRA layers replaced by their untouched base layers (nothing merged)
        if base is not self.model.model:
            raise RuntimeError("peft unload returned another model than the one it wrapped")
        for name, p in base.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
        if hasattr(base, "peft_config"):
            del base.peft_config

    def scope(self) -> Any:
        return self.model.edits_disabled()


@contextmanager
def applied(method: EditMethod, group: EditGroup) -> Iterator[Handle]:
    """``with applied(method, group) as handle:`` answers under the edit; rolled back in ``finally``."""
    handle = method.apply(group)
    try:
        yield handle
    finally:
        method.rollback(handle)


METHODS = ("lafn", "unedited", "in-context", "lora")


def build_methods(names: Sequence[str], model: EditableCausalLM, config: LafnConfig | None = None,
                  lora: LoraSettings | None = None) -> list[EditMethod]:
    """Methods by name (``METHODS``); ``config`` is LAFN's (its edit layers are LoRA's too)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods must not repeat, got {list(names)}")
    built: list[EditMethod] = []
    for name in names:
        if name == "lafn":
            built.append(LafnMethod(model, config))
        elif name == "unedited":
            built.append(UneditedMethod(model))
        elif name == "in-context":
            built.append(InContextMethod(model))
        else:
            built.append(LoraMethod(model, lora, config))
    return built
