"""``RoutingConfig``: which routing stages run and how the representation stage decides."""

from __future__ import annotations

from dataclasses import dataclass

#: Languages whose names take case endings (ISO 639-1): their subjects inflect in matching
#: (``lafn_hf.routing.inflection``). Baltic, Slavic, Finno-Ugric, Turkic and a few more; German for its genitive -s.
INFLECTING_LANGUAGES = ("az", "be", "bg", "cs", "de", "el", "et", "fi", "hr", "hu", "hy", "is", "ka", "kk", "ky",
                        "la", "lt", "lv", "mk", "pl", "ro", "ru", "sk", "sl", "sq", "sr", "tr", "uk", "uz")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing settings of an ``EditableCausalLM`` (inference, and the keys ``edit()`` stores).

    Args:
        normalize: lexical matching on folded text (case, accents in Latin/Greek/Cyrillic, compatibility
            forms, apostrophe/quote/dash variants, whitespace runs); ``False``: exact after NFC.
        aliases: entries' aliases route like their subjects.
        inflections: subjects of ``inflecting_languages`` also match with their word endings changed
            ("Антона Минарика" for "Антон Минарик"; ``lafn_hf.routing.inflection``), and those of several words
            reordered or derived ("собор Инсбрука" for "Инсбрукский собор"; ``lafn_hf.routing.reorder``); needs
            ``normalize``.
        inflecting_languages: language codes whose subjects inflect (compared case-insensitively on the
            primary subtag: "ru" covers "ru-RU" and "ru_RU").
        spellings: subjects written in Thai, Lao, Khmer or Myanmar script (6 letters or more) also match
            spelled another way, within one edit per 6 letters ("โจเซฟ แพปป์" for "โจเซฟ แปป";
            ``lafn_hf.routing.spelling``); needs ``normalize``.
        representation: ``edit()`` stores a routing key per entry, and inference fires entries whose key
            matches a token's hidden state (see ``lafn_hf.routing``).
        threshold_floor: the lowest threshold ``edit()`` gives a key (a cosine in the key space). 0.8 was
            measured on the MzsRE dev split with Gemma-3-270M: 0.7 let 1.2-8.5% of unrelated questions fire.
        threshold_margin: ``edit()`` sets a key's threshold to the highest cosine any built-in negative
            sentence token, or another entry's key, reaches with it plus this margin (at least
            ``threshold_floor``); other entries' thresholds rise likewise.
        threshold: when set, every key fires above this cosine instead of its own stored threshold.
        scope: ``edit()`` stores a question scope per entry, and inference fires an entry only on questions in
            its scope (``lafn_hf.routing.scope``): a question naming the subject but asking another relation
            ("Who designed the Eiffel Tower?" after an edit of where it stands) keeps the base model's answer.
            ``False``: entries fire wherever their subject is found, as in the paper (and as banks made before
            scopes always do).
        scope_margin: the margin ``edit()`` stores in a scope: a question is in scope when its pooled state is
            nearer to the entry's prompts (or its relation's built-in questions) than to any other relation's,
            by at least this cosine difference. Lower lets more rephrasings and more other-relation questions
            through. -0.1 measured on MzsRE dev en+zh (Gemma-3-270M, 50 items): rephrasings 85% in scope,
            same-subject other-relation questions 5%; 0.0: 73% / 3%; -0.15: 92% / 9%.
        scope_margin_override: when set, every scope uses this margin instead of its own stored one.
    """

    normalize: bool = True
    aliases: bool = True
    inflections: bool = True
    inflecting_languages: tuple[str, ...] = INFLECTING_LANGUAGES
    spellings: bool = True
    representation: bool = True
    threshold_floor: float = 0.8
    threshold_margin: float = 0.05
    threshold: float | None = None
    scope: bool = True
    scope_margin: float = -0.1
    scope_margin_override: float | None = None

    def inflects(self, language: str) -> bool:
        """Do subjects of ``language`` inflect in matching under these settings?"""
        primary = language.replace("_", "-").split("-")[0].lower()
        return self.inflections and self.normalize and primary in self.inflecting_languages

    def __post_init__(self) -> None:
        for name in ("normalize", "aliases", "inflections", "spellings", "representation", "scope"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RoutingConfig.{name} must be a bool, got {getattr(self, name)!r}")
        languages = self.inflecting_languages
        if not isinstance(languages, tuple) or not all(isinstance(code, str) and code for code in languages):
            raise TypeError(f"RoutingConfig.inflecting_languages must be a tuple of language codes, got {languages!r}")
        object.__setattr__(self, "inflecting_languages", tuple(code.lower() for code in languages))
        for name in ("threshold_floor", "threshold_margin", "threshold"):
            value = getattr(self, name)
            if value is None and name == "threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RoutingConfig.{name} must be a number, got {value!r}")
            low = 0.0 if name == "threshold_margin" else -1.0
            if not low <= float(value) <= 1.0:
                raise ValueError(f"RoutingConfig.{name} must be in [{low:g}, 1], got {value!r}")
        for name in ("scope_margin", "scope_margin_override"):
            value = getattr(self, name)
            if value is None and name == "scope_margin_override":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RoutingConfig.{name} must be a number, got {value!r}")
            if not -2.0 <= float(value) <= 2.0:
                raise ValueError(f"RoutingConfig.{name} must be a cosine difference in [-2, 2], got {value!r}")


#: Named stage sets (``lafn bench --routing``): the exact matcher alone (the paper's rule), the lexical stages,
#: every stage but question scopes (an entry fires on every question naming its subject), every stage.
ROUTING_PRESETS: dict[str, RoutingConfig] = {
    "exact": RoutingConfig(normalize=False, aliases=False, inflections=False, spellings=False, representation=False,
                           scope=False),
    "lexical": RoutingConfig(representation=False),
    "unscoped": RoutingConfig(scope=False),
    "full": RoutingConfig(),
}
