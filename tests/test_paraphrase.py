from __future__ import annotations

from typing import Any

import pytest
import torch

from lafn_hf.paraphrase import INSTRUCTION, generate_paraphrases, parse_paraphrases


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
