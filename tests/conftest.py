from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lafn_hf import BankEntry, EditBank, EditGroup, LayerUpdate
from lafn_hf.bank.base_model import BaseModelRef
from lafn_hf.models import tiny_fact_group, tiny_model_path

TINY_DIR = tiny_model_path()
# the forward's KV cache keyword: ``cache`` since transformers 5.21-5.24 (``past_key_values`` is its deprecated
# alias there, removal in 5.40), ``past_key_values`` before
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
SMALL_BASE = BaseModelRef("acme/tiny", None, "llama", 32, 64, 3)  # a base the small test banks name


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(TINY_DIR)


@pytest.fixture(scope="session")
def facts() -> dict[str, Any]:
    return json.loads((TINY_DIR / "facts.json").read_text(encoding="utf-8"))


@pytest.fixture()
def trained_model() -> Any:
    """The shipped tiny LLaMA that knows 50 invented capitals in en and zh."""
    return AutoModelForCausalLM.from_pretrained(TINY_DIR).eval()


def random_model(kind: str, vocab_size: int) -> Any:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


@pytest.fixture(params=["llama", "qwen2"])
def random_base(request: pytest.FixtureRequest, tokenizer: Any) -> Any:
    return random_model(request.param, len(tokenizer))


def make_entry(subjects: dict[str, str], layers: tuple[int, ...] = (1,), size: int = 64, scale: float = 3.0,
               seed: int = 0) -> BankEntry:
    generator = torch.Generator().manual_seed(seed)
    updates = {}
    for layer in layers:
        neurons = torch.randperm(size, generator=generator)[: size // 2].sort().values
        updates[layer] = LayerUpdate(neurons, scale * torch.randn(neurons.numel(), generator=generator))
    return BankEntry(subjects=subjects, updates=updates, metadata={"targets": {"en": "x"}})


def fact_group(facts: dict[str, Any], source: int, target: int,
               languages: tuple[str, ...] = ("en", "zh")) -> EditGroup:
    """Edit fact ``source`` so that its capital becomes fact ``target``'s capital (templates 1-2 locate)."""
    return tiny_fact_group(source, target, languages, facts)


def greedy(model: Any, tokenizer: Any, prompt: str, new_tokens: int = 6) -> str:
    encoded = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def weights_file(directory: Path) -> Path:
    found = sorted(directory.glob("lafn_bank*.safetensors"))
    assert len(found) == 1, found
    return found[0]


def same_bank(a: EditBank, b: EditBank) -> bool:
    if [e.id for e in a] != [e.id for e in b]:
        return False
    for x, y in zip(a, b):
        if x.subjects != y.subjects or x.metadata != y.metadata or x.updates.keys() != y.updates.keys():
            return False
        if not all(torch.equal(x.updates[k].neurons, y.updates[k].neurons)
                   and torch.equal(x.updates[k].delta, y.updates[k].delta) for k in x.updates):
            return False
    return True
