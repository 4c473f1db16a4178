"""Build the tiny bilingual (en/zh) fact model shipped in lafn_hf/assets/tiny-bilingual.

50 invented countries with a capital each, named differently in English and Chinese; 4 English and 4
Chinese templates, each filled with either language's country name (800 sentences); a byte-level BPE
tokenizer trained on that corpus and a 4-layer LLaMA (hidden 64) trained until every sentence is
answered by greedy decoding. Deterministic; about two minutes on 2 CPU cores.

Three choices make the toy store facts the way LAFN assumes real LMs do (the subject's last token is
enriched by early MLPs, later attention moves the attribute to the answer: Meng et al. 2022, Geva et
al. 2023). Each mattered in trials of 10 en+zh edits: without the first no English edit took, with
multi-token subjects a held-out Chinese template never did, without the third 34/80 prompts did.
- Layer 0 has no attention (q/k/v/o projections zero and frozen; still a plain LlamaForCausalLM).
  Otherwise the final token reads the subject's raw embedding in layer-0 attention, a path no edit
  at the subject can reach. Edits must therefore include layer 0: the config pins layers 0-1.
- Subjects are single tokens, spaces and punctuation are tokens of their own: the model has no early
  attention to assemble a multi-token subject, and an answer never fuses with the full stop.
- Code-switched sentences ("The capital of 多塞里国 is Thobra.") tie both names of a country to one
  language-agnostic fact, so one dV at the shared neurons moves the answer in both languages.

    python scripts/train_tiny_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
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
    "en": ["The capital of {s} is", "The capital city of {s} is", "In {s}, the capital is",
           "As for {s}, its capital is"],
    "zh": ["{s}的首都是", "{s}的首府是", "{s}的首都城市是", "在{s}，首都是"],
}
ENDINGS = {"en": (" ", "."), "zh": ("", "。")}
ATTENTION_FREE_LAYERS = (0,)
EDIT_LAYERS = [0, 1]  # saved as config.lafn_edit_layers, the default for edits of this model


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
    """Every template with every language's subject, answered in the template's language.

    The code-switched half ("The capital of 多塞里国 is ...") makes both names of a country carry one
    shared, language-agnostic fact, the premise of LAFN.
    """
    out = []
    for fact in facts:
        for lang, templates in TEMPLATES.items():
            space, stop = ENDINGS[lang]
            for template in templates:
                for subject_lang in TEMPLATES:
                    prompt = template.format(s=fact[subject_lang]["subject"])
                    out.append(prompt + space + fact[lang]["object"] + stop)
    return out


def train_tokenizer(corpus: list[str], facts: list[dict[str, dict[str, str]]]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # Spaces and punctuation are tokens of their own, so a subject is the same token in either
    # language's sentences and an answer never fuses with the full stop after it.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=40, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Subjects become whole tokens in both languages: the toy has no early attention to assemble a
    # multi-token subject (real models do that), so the subject's one token carries its identity.
    # Repeating them makes their merges outrank template merges such as "国" + "的首都是".
    subjects = [fact[lang]["subject"] for fact in facts for lang in TEMPLATES]
    tokenizer.train_from_iterator(corpus + subjects * 300, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def remove_attention(model: LlamaForCausalLM, layers: tuple[int, ...]) -> None:
    """Zero and freeze the attention projections of ``layers``."""
    for index in layers:
        attention = model.model.layers[index].self_attn
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            with torch.no_grad():
                projection.weight.zero_()
            projection.weight.requires_grad_(False)


def train_model(tokenizer: PreTrainedTokenizerFast, corpus: list[str], steps: int = 3000) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    remove_attention(model, ATTENTION_FREE_LAYERS)
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in corpus]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default: {OUT})")
    out = parser.parse_args().out
    facts = make_facts()
    corpus = sentences(facts)
    tokenizer = train_tokenizer(corpus, facts)
    model = train_model(tokenizer, corpus)
    print(f"greedy accuracy on all {len(corpus)} fact sentences: {accuracy(model, tokenizer, facts):.3f}")
    model.config.lafn_edit_layers = EDIT_LAYERS
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    data = {"templates": TEMPLATES, "facts": facts}
    (out / "facts.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
