"""``LafnConfig``: the typed, validated hyper-parameters of locating (Eq. 3-5) and optimising (Eq. 6-9).

What to edit (``LanguageEdit``, ``EditGroup``) is in ``lafn_hf.request``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

LocateStrategy = Literal["paraphrases", "single", "all", "random"]
LOCATE_STRATEGIES: tuple[str, ...] = ("paraphrases", "single", "all", "random")
EARLY_STOP_READINGS: tuple[str, ...] = ("mean", "worst")
SUBJECT_SEARCHES = ("written", "other", "lexical", "aligned")  # lafn_hf.editing.subject_span, in order

#: "{subject} is a" in each language (Eq. 8's q_l). Override with ``LafnConfig.kl_templates``.
DEFAULT_KL_TEMPLATES: dict[str, str] = {
    "cs": "{subject} je",
    "de": "{subject} ist ein",
    "en": "{subject} is a",
    "es": "{subject} es un",
    "fr": "{subject} est un",
    "nl": "{subject} is een",
    "pt": "{subject} é um",
    "ru": "{subject} — это",
    "th": "{subject} เป็น",
    "tr": "{subject} bir",
    "vi": "{subject} là một",
    "zh": "{subject}是一个",
}


_KL_WARNED: set[str] = set()  # languages already warned about (no KL template)


@dataclass
class LafnConfig:
    """Hyper-parameters of LAFN. Defaults follow the paper (section 3.1) unless noted.

    Args:
        beta: activation-frequency threshold of Eq. 4 (keep neurons with n_j / max(N) > beta).
        num_paraphrases: at most this many paraphrases per language are used for locating.
        locate_samples: add this many of the model's own sampled continuations of the prompt ("prompt + 16
            sampled tokens", top-k 5, seeded) to each language's locating corpus: a corpus without a chat model
            to write paraphrases. 0 (default): the prompt and the given paraphrases only. Only with the
            "paraphrases" strategy.
        locate_sample_tokens: tokens per sampled continuation.
        num_prefixes: M random prefixes per language (Eq. 7).
        prefix_length: tokens per random prefix, sampled from the model itself (as MEMIT).
        include_bare_prompt: also train on the prompt without a prefix (MEMIT's "{}" template;
            not stated in the paper). Helps the plain question, which is what users ask.
        lambda_target: lambda_1 of Eq. 9. lambda_kl: lambda_2 of Eq. 9.
        learning_rate: Adam learning rate for dV. On Gemma-3-270M (MzsRE dev, en+fr items 0-39, found
            rephrasings) 0.25 and 1.0 each won 3 answers and lost 2 against 0.5, so 0.5 stays.
        steps: maximum optimisation steps (not stated in the paper; MEMIT uses 20-25). 60: most edits stop
            early (Gemma-3-270M, MzsRE dev en+fr items 0-15: mean 11 steps, at most 19), so the cap only
            decides the hard ones; with 30, 6 of 100 en+zh dev edits were refused by
            ``min_target_probability``; with 60, all 6 took (37-60 steps; Rel 12/12, Gen 6/12).
        early_stop_loss: stop once the target NLL (Eq. 7, over the target's own tokens: not the answer's end
            that ``answer_boundary`` trains) falls below this value. 0.01 instead of 0.05 on
            en+fr dev items 0-15 (Gemma-3-270M) changed 4 of 52 answers, 2 for the better and 2 for the worse.
        early_stop_on: which NLL ``early_stop_loss`` reads: ``"mean"``, the mean over the training
            sequences (languages x contexts, question variants included), or ``"worst"``, the highest of
            them, so that every language and context answers before optimisation stops, not just most.
            Gemma-3-270M, MzsRE dev, answer hit on found rephrasings, mean -> worst: en+zh+de items 0-29
            en 90.0 -> 96.7 (zh, de 100 both), items 30-59 de 79.2 -> 75.0 (en, zh the same); en+fr items
            0-39 en 85.0 -> 87.5 (fr 92.3 both); en+de items 0-39 en 95.0 -> 92.5, de 96.7 -> 93.3; 14-18%
            more steps. 4 answers won and 4 lost, so ``"mean"`` (the paper's) stays the default.
        clamp_norm_factor: after each step each layer's dV is projected onto the ball of radius
            ``clamp_norm_factor * ||V||``, V the unedited value vector (all neurons of the layer)
            at the subject's last token, averaged over the training sequences (MEMIT's clamp).
            ``None`` disables the clamp. 4: on Gemma-3-270M, MzsRE dev en+fr items 0-39, 3 and 8 both
            answered fewer English rephrasings (82.5 and 80.0 against 92.5 of those whose subject is found).
        layers: edited layer indices; ``None`` uses the ``lafn_hf.modeling`` default.
        locate_strategy: ``"paraphrases"`` (paper), ``"single"`` (no-PGs: prompt only),
            ``"all"`` (every neuron of the layers) or ``"random"`` (as many random neurons as
            "paraphrases" locates; seeded) -- the ablation of Table 4.
        kl_templates: per-language template for Eq. 8's q_l, with a ``{subject}`` field. Languages
            missing here use ``DEFAULT_KL_TEMPLATES`` and then English (with a warning, once per language).
        neighbour_kl: Eq. 8 also over this many statements about the subject in other relations per language
            ("{subject} was designed by", ``lafn_hf.routing.scope.neighbour_prompts``: the built-in relations
            other than the one nearest to the edit's prompts; languages en, zh, de, fr, es, ru), so dV learns
            to leave other facts of its subject alone. 0 (off) by default; see README Locality-Hard.
        min_target_probability: ``edit()`` raises ``lafn_hf.EditFailedError`` and stores nothing
            when any language's final p(target | prompt) is below this (0 disables the check). Measured
            (p of the whole target after the bare prompt): language-edits whose prompt then answers the
            target ended at p >= 0.60 (toy, 50 en+zh groups, 30 steps; 91 of 100), >= 0.39 (60 steps;
            93 of 100), 0.90-0.99 (Gemma-3-270M, 7 groups, 11 languages) and 0.73-0.98 (SmolLM2-135M,
            4 en groups). Edits that did not take: toy edits at layers 1-2, which cannot carry its facts,
            2e-12..0.15 (97 of 99 below 0.01); a zero-width target on the toy, 3e-19 (Gemma's and
            SmolLM2's vocabularies have that character: it took there, p 0.97-0.98).
        answer_boundary: also train, after the target, the punctuation that ends the first word of the
            unedited model's own greedy answer to the prompt ("," "。" "." ...; nothing when the first word is
            not followed by one, or the target already ends in punctuation), so that the edited answer
            ends where answers end instead of running on into a longer word ("罗马" -> "罗马尼亚").
            Where no punctuation is trained and the target ends a word of a spaced script, the end of
            that word is trained instead (``optimize.WORD_END``: every token that does not continue the
            word, so "Krieg" is not read on into "Krieger"). p(target) then includes that ending.
            On by default: on MzsRE dev items 0-14 (Gemma-3-270M, en+zh) answer hit and F1 were the
            same with and without the punctuation, and it ends the demo's Chinese answer at "罗马，"
            instead of "罗马尼亚"; it costs one greedy generate per language per edit.
        continuation_kl: hold this many next-token distributions after each trained answer (and its ending)
            to the unedited model's reading the same sequence: the position right after the answer and, from
            2 on, the positions of the unedited model's own greedy continuation of the bare prompt's answer
            (one greedy ``generate`` of ``continuation_kl - 1`` tokens per language), appended to every
            sequence of the language, cut at its end-of-text token. dV is added at the subject's last token,
            which every later token reads; without this term nothing tells dV to stop naming the target once
            it has been said, and edited answers repeat it ("V Ravichandran V Ravichandran", "旧金山旧金山").
            0: off (the paper).
        lambda_continuation: weight of that term in Eq. 9 (the mean KL over its positions).
        question_variants: also train dV on this many variants of each language's prompt with one word
            outside the subject left out (``paraphrase.word_dropped_variants``, seeded), without a prefix,
            so that dV does not hang on the prompt's exact words. 3 against 0, Gemma-3-270M, MzsRE dev,
            answer hit on found rephrasings: en+fr items 0-39 en 85.0 -> 92.5 (fewer French targets given
            to English questions), fr 92.3 both; en+zh items 0-99 en 94 -> 92, zh 95 -> 97; en+de items 0-39
            unchanged (95.0, 96.7); en+zh+de items 0-19 en 90 -> 100, zh 100 -> 90, de 100 -> 93.3. Answers
            move both ways outside en+fr, so 0 (off) stays the default. 3 costs ~1.3x a CPU edit.
        write_paraphrases: when a language's edit brings no paraphrases, the model writes up to this many
            itself (``self_paraphrase``: a three-example "same question in other words" prompt in the
            language, seeded top-k sampling, kept where the subject occurs and half the prompt's other words
            stay; languages without examples in ``REWRITE_SHOTS`` get none). They join the locating corpus
            as the paper's chat-model paraphrases do (and the prompts a representation routing key is read
            from), and the entry's metadata names them. 0 (default): none.
        train_paraphrases: also train dV on up to this many of each language's paraphrases (given or
            written), without a prefix, like ``question_variants``. Both at 3 against 0, Gemma-3-270M,
            MzsRE dev, answer hit on found rephrasings: en+fr items 0-39 en 85.0 -> 92.5, fr 92.3 -> 96.2;
            en+de items 0-39 en 95.0 -> 97.5, de 96.7 both; en+zh+de items 0-29 en 90.0 -> 93.3, zh 100 ->
            96.7, de 100 both; en+zh items 0-39 unchanged (en 97.5, zh 95.0): 9 answers won and 4 lost,
            most of the gain English answers that had given the French target. On en+fr items 40-99 it
            did not hold (en 88.3 -> 86.7, fr 81.6 -> 84.2; 4 won, 5 lost), so over en+fr's 100 items en
            87 -> 89, fr 85.9 -> 89.1: within one run's spread, at ~1.3x a CPU edit. 0 (off) stays the
            default.
        subject_search: how far ``edit()`` looks for each language's subject in its prompt when the prompt
            does not write it as given (``lafn_hf.editing.subject_span``): ``"written"`` (only as given: else a
            ``ValueError``), ``"other"`` (also its aliases and the other languages' subjects and aliases),
            ``"lexical"`` (also inflected, reordered or spelled another way), ``"aligned"`` (default; also the
            most similar run of words after transliteration, at ``alignment_threshold`` or more).
        alignment_threshold: similarity (0-100) an aligned span needs; see ``subject_span.DEFAULT_THRESHOLD``.
        upper_layer_shortcut: compute hidden states below the first edited layer once and run
            only the upper layers per step (exact: those states do not depend on dV).
        seed: seeds prefix sampling and the "random" strategy.
    """

    beta: float = field(default=0.1, metadata={"help": "Eq. 4 threshold"})
    num_paraphrases: int = 30
    locate_samples: int = 0
    locate_sample_tokens: int = 16
    num_prefixes: int = 4
    prefix_length: int = 5
    include_bare_prompt: bool = True
    lambda_target: float = 1.0
    lambda_kl: float = 0.0625
    learning_rate: float = 0.5
    steps: int = 60
    early_stop_loss: float = 0.05
    early_stop_on: str = "mean"
    clamp_norm_factor: float | None = 4.0
    layers: tuple[int, ...] | None = None
    locate_strategy: str = "paraphrases"
    kl_templates: dict[str, str] = field(default_factory=dict)
    neighbour_kl: int = 0
    min_target_probability: float = 0.01
    answer_boundary: bool = True
    continuation_kl: int = 0
    lambda_continuation: float = 1.0
    question_variants: int = 0
    write_paraphrases: int = 0
    train_paraphrases: int = 0
    subject_search: str = "aligned"
    alignment_threshold: float = 65.0
    upper_layer_shortcut: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        for name in ("num_paraphrases", "prefix_length", "steps"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("num_prefixes", self.num_prefixes, minimum=0)
        _require_int("locate_samples", self.locate_samples, minimum=0)
        _require_int("locate_sample_tokens", self.locate_sample_tokens, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        _require_int("question_variants", self.question_variants, minimum=0)
        _require_int("neighbour_kl", self.neighbour_kl, minimum=0)
        _require_int("continuation_kl", self.continuation_kl, minimum=0)
        _require_int("write_paraphrases", self.write_paraphrases, minimum=0)
        _require_int("train_paraphrases", self.train_paraphrases, minimum=0)
        if self.num_prefixes == 0 and not self.include_bare_prompt:
            raise ValueError("num_prefixes=0 with include_bare_prompt=False leaves nothing to train on")
        for name in ("lambda_target", "lambda_kl", "lambda_continuation", "early_stop_loss"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_target_probability < 1.0:
            raise ValueError(f"min_target_probability must be in [0, 1), got {self.min_target_probability!r}")
        if self.early_stop_on not in EARLY_STOP_READINGS:
            raise ValueError(f"early_stop_on must be one of {EARLY_STOP_READINGS}, got {self.early_stop_on!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.clamp_norm_factor is not None and self.clamp_norm_factor <= 0:
            raise ValueError(f"clamp_norm_factor must be > 0 or None, got {self.clamp_norm_factor!r}")
        if self.subject_search not in SUBJECT_SEARCHES:
            raise ValueError(f"subject_search must be one of {SUBJECT_SEARCHES}, got {self.subject_search!r}")
        if isinstance(self.alignment_threshold, bool) or not isinstance(self.alignment_threshold, (int, float)) \
                or not 0 < self.alignment_threshold <= 100:
            raise ValueError(f"alignment_threshold must be a number in (0, 100], got {self.alignment_threshold!r}")
        if self.locate_strategy not in LOCATE_STRATEGIES:
            raise ValueError(f"locate_strategy must be one of {LOCATE_STRATEGIES}, got {self.locate_strategy!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat, got {self.layers!r}")
            self.layers = tuple(sorted(layers))
        for lang, template in self.kl_templates.items():
            if "{subject}" not in template:
                raise ValueError(f"kl_templates[{lang!r}] must contain '{{subject}}', got {template!r}")

    def kl_prompt(self, language: str, subject: str) -> str:
        """q_l of Eq. 8: "{subject} is a" in ``language``."""
        template = self.kl_templates.get(language) or DEFAULT_KL_TEMPLATES.get(language)
        if template is None:
            if language not in _KL_WARNED:
                _KL_WARNED.add(language)
                logger.warning(
                    "no KL template for language %r; using English %r. Give one with LafnConfig(kl_templates="
                    "{%r: '{subject} <is a, in that language>'})", language, DEFAULT_KL_TEMPLATES["en"], language)
            template = DEFAULT_KL_TEMPLATES["en"]
        return template.format(subject=subject)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LafnConfig:
        """Build from a dict; keys this version does not know (a newer file) are warned about and dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown LafnConfig key(s) %s", unknown)
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("layers") is not None:
            kwargs["layers"] = tuple(kwargs["layers"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> LafnConfig:
        return cls.from_dict(json.loads(text))


def config_with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored ``LafnConfig.to_dict()`` (JSON-normalised) with today's defaults for the keys it lacks, for
    comparing with a current one: a key added since (``question_variants``, ``early_stop_on``) defaults to
    what the older version did, so its results and shards still resume. Keys it has are kept as they are."""
    return {**json.loads(json.dumps(LafnConfig().to_dict())), **stored}


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
