"""Build the tiny bilingual (en/zh) fact model shipped in lafn_hf/assets/tiny-bilingual.

50 invented countries and capitals, 4 English and 4 Chinese templates each; a byte-level BPE
tokenizer trained on that corpus and a 4-layer LLaMA (hidden 64) trained until every fact is
answered by greedy decoding. Deterministic; about a minute on 2 CPU cores:

    python scripts/train_tiny_model.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "lafn_hf" / "assets" / "tiny-bilingual"
EN_SYLLABLES = ["val", "dor", "mir", "ka", "lun", "tes", "bra", "no", "sel", "qua", "ren", "zo", "fi", "mar", "tho"]
ZH_CHARS = "瓦多米卡伦特布诺塞夸仁佐菲马托尔里亚斯兰纳维"
TEMPLATES = {
    "en": ["The capital of {s} is", "{s}'s capital is", "The capital city of {s} is", "In {s}, the capital is"],
    "zh": ["{s}的首都是", "{s}的首府是", "{s}的首都城市是", "在{s}，首都是"],
}
ENDINGS = {"en": (" ", "."), "zh": ("", "。")}
# Training-only pattern where the capital follows the subject directly: it makes the model store the
# fact at the subject's last token (as real LMs do, and as LAFN assumes) instead of looking it up later.
ENRICH = {"en": "{s} {o}.", "zh": "{s}，{o}。"}


def make_facts(count: int = 50, seed: int = 0) -> list[dict[str, dict[str, str]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    facts = []
    while len(facts) < count:
        en_country = "".join(rng.sample(EN_SYLLABLES, 3)).capitalize()
        en_capital = "".join(rng.sample(EN_SYLLABLES, 2)).capitalize()
        zh_country = "".join(rng.sample(ZH_CHARS, 3)) + "国"
        zh_capital = "".join(rng.sample(ZH_CHARS, 2)) + "城"
        keys = {en_country, en_capital, zh_country, zh_capital}
        if keys & seen or len(keys) < 4:
            continue
        seen |= keys
        facts.append({"en": {"subject": en_country, "object": en_capital},
                      "zh": {"subject": zh_country, "object": zh_capital}})
    return facts


def sentences(facts: list[dict[str, dict[str, str]]]) -> list[str]:
    out = []
    for fact in facts:
        for lang, templates in TEMPLATES.items():
            space, stop = ENDINGS[lang]
            for template in templates:
                out.append(template.format(s=fact[lang]["subject"]) + space + fact[lang]["object"] + stop)
            out.append(ENRICH[lang].format(s=fact[lang]["subject"], o=fact[lang]["object"]))
    return out


def train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Subjects become whole tokens (as in a real model, their last token carries the identity).
    subject_words = [line.split(" ")[3] for line in corpus if line.startswith("The capital of ")]
    tokenizer.train_from_iterator(corpus + [" " + w for w in subject_words] * 30, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def train_model(tokenizer: PreTrainedTokenizerFast, corpus: list[str], steps: int = 3000) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in corpus]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        pick = torch.randint(0, len(rows), (64,), generator=generator)
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    return model.eval()


def accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, facts: list[dict]) -> float:
    correct = total = 0
    for fact in facts:
        for lang, templates in TEMPLATES.items():
            for template in templates:
                prompt = template.format(s=fact[lang]["subject"])
                encoded = tokenizer(prompt, return_tensors="pt")
                out = model.generate(**encoded, max_new_tokens=8, do_sample=False, pad_token_id=0)
                text = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
                correct += text.strip().startswith(fact[lang]["object"])
                total += 1
    return correct / total


def main() -> None:
    facts = make_facts()
    corpus = sentences(facts)
    tokenizer = train_tokenizer(corpus)
    model = train_model(tokenizer, corpus)
    print(f"greedy accuracy on all {len(corpus)} fact sentences: {accuracy(model, tokenizer, facts):.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    data = {"templates": TEMPLATES, "facts": facts}
    (OUT / "facts.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
