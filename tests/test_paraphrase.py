from __future__ import annotations

from typing import Any

import pytest
import torch

from lafn_hf.editing.paraphrase import INSTRUCTION, generate_paraphrases, parse_paraphrases


def test_parse_keeps_distinct_lines_with_the_subject() -> None:
    text = ('1. Where is the Eiffel Tower?\n2) Where is the Eiffel Tower?\n- "In which city is the Eiffel Tower?"\n'
            "3. Which city is it in?\n4、埃菲尔铁塔在哪里？\nWhere is the Eiffel Tower located?")
    assert parse_paraphrases(text, "Eiffel Tower", "Where is the Eiffel Tower located?") == [
        "Where is the Eiffel Tower?", "In which city is the Eiffel Tower?"]
    assert parse_paraphrases(text, "埃菲尔铁塔", "埃菲尔铁塔位于哪里？") == ["埃菲尔铁塔在哪里？"]


def test_generate_uses_the_chat_template_and_filters(tokenizer: Any) -> None:
    seen: dict[str, Any] = {}

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> dict[str, torch.Tensor]:
            seen["message"] = messages[0]["content"]
            return {"input_ids": torch.tensor([[1, 2, 3]])}

        def decode(self, ids: Any, skip_special_tokens: bool) -> str:
            return "1. Where is the Eiffel Tower?\n2. Where is Paris?\n3. Where can I find the Eiffel Tower?"

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.cat([input_ids, torch.tensor([[9, 9]])], dim=1)

    out = generate_paraphrases(Model(), Chat(), "Eiffel Tower", "Where is the Eiffel Tower located?", n=5,
                               language="English")
    assert out == ["Where is the Eiffel Tower?", "Where can I find the Eiffel Tower?"]
    assert seen["message"] == INSTRUCTION.format(n=5, language="English", subject="Eiffel Tower",
                                                 question="Where is the Eiffel Tower located?")
    with pytest.raises(ValueError, match="does not occur in question"):
        generate_paraphrases(Model(), Chat(), "Louvre", "Where is the Eiffel Tower?")


def test_word_dropped_variants_leave_out_one_word_outside_the_subject() -> None:
    from lafn_hf.editing.paraphrase import word_dropped_variants

    prompt = "Which team did Veljko Simić play for?"
    variants = word_dropped_variants(prompt, "Veljko Simić", 3, seed=0)
    assert variants == word_dropped_variants(prompt, "Veljko Simić", 3, seed=0)  # seeded
    assert len(variants) == 3 and all("Veljko Simić" in v and v != prompt for v in variants)
    assert {len(v.split()) for v in variants} == {len(prompt.split()) - 1}  # one word out, no doubled space
    assert set(variants) <= {prompt.replace(w + " ", "", 1) if w != "for?" else prompt.replace(" for", "")
                             for w in ("Which", "team", "did", "play", "for?")}
    french = word_dropped_variants("Qui est la mère de Béni Ferenczy ?", "Béni Ferenczy", 5)
    assert "Qui est la mère Béni Ferenczy ?" in french and all(v.endswith("Ferenczy ?") for v in french)
    chinese = word_dropped_variants("Li Jiji的死是意外还是自杀？", "Li Jiji", 12)  # one character at a time
    assert len(chinese) == 9 and "Li Jiji的死是意外还是杀？" in chinese and all(v.endswith("？") for v in chinese)
    assert word_dropped_variants("Where is Paris?", "Paris", 0) == []
    assert word_dropped_variants("Paris?", "Paris", 2) == []  # nothing but the subject to leave out
    folded = word_dropped_variants("Qui a conçu la torpille Mark 19 ?", "Torpille Mark 19", 5)  # as matched
    assert len(folded) == 4 and all(v.endswith("torpille Mark 19 ?") for v in folded)
    with pytest.raises(TypeError, match="count must be an int, got str"):
        word_dropped_variants("Where is Paris?", "Paris", "2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count must be an int >= 0, got -1"):
        word_dropped_variants("Where is Paris?", "Paris", -1)
    with pytest.raises(ValueError, match="'Rome' does not occur"):
        word_dropped_variants("Where is Paris?", "Rome", 2)
