"""``RoutingConfig``: which routing stages run and how the representation stage decides."""

from __future__ import annotations

from dataclasses import dataclass

#: Languages whose names take case endings (ISO 639-1): their subjects inflect in matching
#: (``lafn_hf.inflection``). Baltic, Slavic, Finno-Ugric, Turkic and a few more; German for its genitive -s.
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
            ("Антона Минарика" for "Антон Минарик"; ``lafn_hf.inflection``), and those of several words
            reordered or derived ("собор Инсбрука" for "Инсбрукский собор"; ``lafn_hf.reorder``); needs
            ``normalize``.
        inflecting_languages: language codes whose subjects inflect (compared case-insensitively on the
            primary subtag: "ru" covers "ru-RU" and "ru_RU").
        spellings: subjects written in Thai, Lao, Khmer or Myanmar script (6 letters or more) also match
            spelled another way, within one edit per 6 letters ("โจเซฟ แพปป์" for "โจเซฟ แปป";
            ``lafn_hf.spelling``); needs ``normalize``.
        representation: ``edit()`` stores a routing key per entry, and inference fires entries whose key
            matches a token's hidden state (see ``lafn_hf.routing``).
        threshold_floor: the lowest threshold ``edit()`` gives a key (a cosine in the key space). 0.8 was
            measured on the MzsRE dev split with Gemma-3-270M: 0.7 let 1.2-8.5% of unrelated questions fire.
        threshold_margin: ``edit()`` sets a key's threshold to the highest cosine any built-in negative
            sentence token, or another entry's key, reaches with it plus this margin (at least
            ``threshold_floor``); other entries' thresholds rise likewise.
        threshold: when set, every key fires above this cosine instead of its own stored threshold.
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

    def inflects(self, language: str) -> bool:
        """Do subjects of ``language`` inflect in matching under these settings?"""
        primary = language.replace("_", "-").split("-")[0].lower()
        return self.inflections and self.normalize and primary in self.inflecting_languages

    def __post_init__(self) -> None:
        for name in ("normalize", "aliases", "inflections", "spellings", "representation"):
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


#: Named stage sets (``lafn bench --routing``): the exact matcher alone, the lexical stages, every stage.
ROUTING_PRESETS: dict[str, RoutingConfig] = {
    "exact": RoutingConfig(normalize=False, aliases=False, inflections=False, spellings=False, representation=False),
    "lexical": RoutingConfig(representation=False),
    "full": RoutingConfig(),
}
