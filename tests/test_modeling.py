from __future__ import annotations

import pytest
from torch import nn
from transformers import Gemma3TextConfig, GemmaConfig, LlamaConfig, Qwen2Config

from lafn_hf.modeling import SUPPORTED_MODEL_TYPES, decoder_layers, default_edit_layers, get_spec, mlp_parts


def test_default_edit_layers_match_the_paper() -> None:
    assert default_edit_layers(LlamaConfig(num_hidden_layers=32)) == (10, 11, 12)  # LLaMA2-7b
    assert default_edit_layers(Qwen2Config(num_hidden_layers=32)) == (14, 15, 16)  # Qwen1.5-7b
    assert default_edit_layers(GemmaConfig(num_hidden_layers=18)) == (6, 7, 8)
    assert default_edit_layers(Gemma3TextConfig(num_hidden_layers=18)) == (3, 4, 5)  # Gemma-3-270M, measured
    assert default_edit_layers(LlamaConfig(num_hidden_layers=2)) == (0, 1)


def test_a_checkpoint_can_pin_its_edit_layers() -> None:
    assert default_edit_layers(LlamaConfig(num_hidden_layers=32, lafn_edit_layers=[5, 4])) == (4, 5)
    with pytest.raises(ValueError, match=r"lafn_edit_layers must be a non-empty list of layer indices, got '0,1'"):
        default_edit_layers(LlamaConfig(num_hidden_layers=32, lafn_edit_layers="0,1"))


def test_unsupported_model_type_lists_supported_ones() -> None:
    class Config:
        model_type = "gpt2"

    with pytest.raises(TypeError, match="'gpt2' is not supported.*gemma, gemma2, gemma3, gemma3_text, llama"):
        get_spec(Config())
    assert "qwen3" in SUPPORTED_MODEL_TYPES and "mistral" in SUPPORTED_MODEL_TYPES


def test_structural_check_rejects_ungated_mlp(random_base: nn.Module) -> None:
    layer = decoder_layers(random_base)[0]
    assert mlp_parts(layer).down_proj is layer.mlp.down_proj
    del layer.mlp.gate_proj
    with pytest.raises(TypeError, match=r"no gated MLP \(missing mlp.gate_proj\)"):
        mlp_parts(layer)
