"""The most frequent function words of the MzsRE languages, for refusing subjects that are not subjects.

A bank subject is matched in every prompt, so a subject like "the" edits nearly every English input. These
sets hold, per language, the 20-40 most frequent function words (articles, prepositions, conjunctions,
pronouns, copulas, particles); content words that are also names ("Como", "Van") are left out. Entries are
lower-case (``str.casefold``) and NFC; a subject is compared as a whole.
"""

from __future__ import annotations

from .text import nfc

_WORDS: dict[str, str] = {
    "cs": "a i v ve na do z ze s se k o u od po pro za že je jsou byl byla bylo to ten ta ty tak ale nebo jak jako "
          "co který která které jeho její si by není",
    "de": "der die das den dem des ein eine einer eines einem einen und oder aber in im an am auf aus bei mit von "
          "vom zu zum zur für ist sind war es er sie wir ich nicht auch wie dass so",
    "en": "the a an of in on at to for by with from and or but is are was were be been it its this that these those "
          "as not he she they we you i his her their which who what there has have had do does",
    "es": "el la los las un una unos unas de del al y o pero en con por para es son era fue que se su sus lo le no "
          "más este esta ese esa él ella yo",
    "fr": "le la les un une des du de et ou mais en dans sur au aux à par pour avec est sont était il elle "
          "ils elles on je nous vous ce cette ces qui que ne pas se sa son ses y",
    "nl": "de het een en of maar van in op aan met voor door bij naar uit is zijn was waren dat die dit deze er hij "
          "zij ze ik we wij niet te om als ook",
    "pt": "o a os as um uma de do da dos das em no na nos nas e ou mas por para com que se é são foi era ele ela "
          "seu sua não ao à pelo pela",
    "ru": "и в во не на с со что как а но или к у по из за от о об для это этот он она оно они мы вы я его её их "
          "был была было были же бы то так да",
    "th": "ที่ และ ใน ของ เป็น มี ได้ ไม่ จะ ให้ การ ว่า กับ ความ นี้ แต่ ก็ ไป มา อยู่ แล้ว คือ หรือ โดย จาก ซึ่ง เมื่อ "
          "ถ้า ยัง ต้อง นั้น ผู้ เขา ฉัน ผม คุณ",
    "tr": "ve bir bu şu o da de ile için gibi ama veya ya çok daha ne ki mi mı mu mü ben sen biz siz onlar olan "
          "olarak var yok her en kadar",
    "vi": "và của là có được trong cho với không một những các này đó đã sẽ đang thì mà để từ khi về ra vào như "
          "tại theo cũng nó",
    "zh": "的 了 是 在 和 与 及 或 也 都 就 而 但 这 那 这个 那个 一 一个 个 我 你 他 她 它 我们 你们 "
          "他们 有 不 没有 之 其 被 把 对 从 为 于 以 着 过 吗 呢 吧",
}

#: language code -> its most frequent function words (casefolded).
STOP_WORDS: dict[str, frozenset[str]] = {lang: frozenset(nfc(w) for w in words.split()) for lang, words in _WORDS.items()}


def is_stop_word(text: str, language: str) -> bool:
    """Whether ``text`` as a whole (case-insensitively) is one of ``language``'s frequent function words.

    Languages without a list never match.
    """
    return nfc(text.strip().casefold()) in STOP_WORDS.get(language, frozenset())
