"""The demo edit (Eiffel Tower -> Rome, en/zh/de, Gemma-3-270M) against other questions about the Eiffel Tower.

Edits the README demo's group once, then answers greedily (16 tokens) its located prompts, its held-out prompts
and eleven questions about other relations of the same subject, unedited, with the question scope (today's
default) and without it (the paper's subject-only rule). Prints every answer and, per kind, how many name the
target ("Rome", "罗马", "Rom").

    python benchmarks/demo_locality.py [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

from lafn_hf import EditableCausalLM, EditGroup
from lafn_hf.bench.metrics import contains
from lafn_hf.cli.common import load_model
from lafn_hf.evaluate import predict_batch
from lafn_hf.routing import RoutingConfig

#: Other relations of the Eiffel Tower (designer, material, height, opening, ...), as a user would ask them.
OTHER_RELATIONS = {
    "en": ["Who designed the Eiffel Tower?", "The Eiffel Tower was designed by", "What is the Eiffel Tower made of?",
           "How tall is the Eiffel Tower?", "When was the Eiffel Tower built?", "Who owns the Eiffel Tower?",
           "The Eiffel Tower is made of"],
    "zh": ["埃菲尔铁塔是谁设计的？", "埃菲尔铁塔是用什么材料建造的？"],
    "de": ["Wer hat den Eiffelturm entworfen?", "Wann wurde der Eiffelturm gebaut?"],
}
TARGETS = {"en": "Rome", "zh": "罗马", "de": "Rom"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    args = parser.parse_args()
    demo = json.loads(resources.files("lafn_hf").joinpath("assets/demo_eiffel.json").read_text("utf-8"))
    model: EditableCausalLM = load_model(args.model)
    group = EditGroup.from_dict(demo["group"])
    asked = [(lang, "located", text) for lang, edit in group.edits.items() for text in (edit.prompt, *edit.paraphrases)]
    asked += [(lang, "held out", text) for lang, texts in demo["held_out"].items() for text in texts]
    asked.append(("en", "held out", "Where is the Eiffel Tower?"))
    asked += [(lang, "other relation", text) for lang, texts in OTHER_RELATIONS.items() for text in texts]
    texts = [text for _, _, text in asked]
    decode = model.tokenizer.decode
    with model.edits_disabled():
        base = [decode(ids, skip_special_tokens=True) for ids in predict_batch(model, texts, budgets=[16] * len(texts))]
    model.edit(group)
    answers = {}
    for name, routing in (("scope", RoutingConfig()), ("no scope", RoutingConfig(scope=False))):
        model.routing = routing
        answers[name] = [decode(ids, skip_special_tokens=True) for ids in
                         predict_batch(model, texts, budgets=[16] * len(texts))]
    for i, (_, kind, text) in enumerate(asked):
        print(f"[{kind}] {text!r}\n   unedited: {base[i]!r}\n   scope:    {answers['scope'][i]!r}"
              f"\n   no scope: {answers['no scope'][i]!r}")
    print("\nanswers naming the target, of each kind:")
    for kind in ("located", "held out", "other relation"):
        rows = [i for i, (_, k, _) in enumerate(asked) if k == kind]
        counts = {name: sum(contains(found[i], TARGETS[asked[i][0]]) for i in rows) for name, found in answers.items()}
        print(f"  {kind:15s} scope {counts['scope']}/{len(rows)}, no scope {counts['no scope']}/{len(rows)}")


if __name__ == "__main__":
    main()
