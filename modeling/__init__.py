"""Per-architecture knowledge: where decoder layers and the gated MLP parts live.

Shipped inside the distribution as ``lafn_hf.modeling``. Everything is keyed on
``config.model_type`` (never on a model name). Every supported architecture has
the gated MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, so the input of
``down_proj`` is the vector of neuron values ("V" in the LAFN paper, Eq. 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "ArchitectureSpec",
    "EDIT_LAYERS_ATTR",
    "MlpParts",
    "SUPPORTED_MODEL_TYPES",
    "decoder_layers",
    "default_edit_layers",
    "get_spec",
    "mlp_parts",
    "text_config",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where one architecture keeps its layers and what to edit by default.

    Args:
        model_type: ``config.model_type`` this entry describes.
        layers_path: dotted attribute path from the causal LM to its decoder ``ModuleList``.
        edit_start_fraction: first default edit layer as a fraction of the depth. The paper
            edits layers 10-12 of LLaMA2-7b (32 layers, 10/32 = 0.31) and 14-16 of
            Qwen1.5-7b (14/32 = 0.44): the language-agnostic neurons peak at 1/3-1/2 depth.
            Gemma 3 uses 0.17, measured on Gemma-3-270M's MzsRE rephrasings (see ``_SPECS``).
        num_edit_layers: how many consecutive layers are edited by default (paper: 3).
        text_config_attr: for multimodal wrappers, the attribute holding the text config.
    """

    model_type: str
    layers_path: str = "model.layers"
    edit_start_fraction: float = 0.31
    num_edit_layers: int = 3
    text_config_attr: str | None = None


_SPECS: dict[str, ArchitectureSpec] = {
    spec.model_type: spec
    for spec in (
        ArchitectureSpec("llama", edit_start_fraction=0.31),
        ArchitectureSpec("mistral", edit_start_fraction=0.31),
        ArchitectureSpec("qwen2", edit_start_fraction=0.44),
        ArchitectureSpec("qwen3", edit_start_fraction=0.44),
        ArchitectureSpec("gemma", edit_start_fraction=0.31),
        ArchitectureSpec("gemma2", edit_start_fraction=0.31),
        # Gemma-3-270M (18 layers): 0.17 -> layers 3, 4, 5. On MzsRE dev (benchmarks/lafn_settings.py) they
        # answered more rephrasings than 6-8 (0.34): en+zh items 0-99 Gen 93 / 92 against 89 / 86, en+fr 88 /
        # 85.9 against 84 / 76.6, en+de items 0-39 95 / 100 against 92.5 / 93.3; Locality 100 in every row.
        ArchitectureSpec("gemma3_text", edit_start_fraction=0.17),
        ArchitectureSpec(
            "gemma3",
            layers_path="model.language_model.layers",
            edit_start_fraction=0.17,
            text_config_attr="text_config",
        ),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_SPECS))


@dataclass(frozen=True)
class MlpParts:
    """The gated MLP of one decoder layer: ``down(act_fn(gate(x)) * up(x))``."""

    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: nn.Module


def get_spec(config: Any) -> ArchitectureSpec:
    """Return the spec for ``config.model_type``; ``TypeError`` when unsupported."""
    model_type = getattr(config, "model_type", None)
    spec = _SPECS.get(str(model_type))
    if spec is None:
        raise TypeError(
            f"model_type {model_type!r} is not supported by lafn_hf; "
            f"supported model_types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return spec


def text_config(config: Any) -> Any:
    """The config holding ``num_hidden_layers`` / ``intermediate_size`` (text part)."""
    spec = get_spec(config)
    return getattr(config, spec.text_config_attr) if spec.text_config_attr else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a supported causal LM, after a structural check."""
    spec = get_spec(model.config)
    node: Any = model
    for attr in spec.layers_path.split("."):
        node = getattr(node, attr, None)
        if node is None:
            raise TypeError(
                f"{type(model).__name__} (model_type {spec.model_type!r}) has no "
                f"'{spec.layers_path}'; expected a decoder-only causal LM"
            )
    if not isinstance(node, nn.ModuleList) or len(node) == 0:
        raise TypeError(f"'{spec.layers_path}' of {type(model).__name__} is not a non-empty ModuleList")
    return node


def mlp_parts(layer: nn.Module) -> MlpParts:
    """The gated MLP parts of a decoder layer; ``TypeError`` when it is not gated."""
    mlp = getattr(layer, "mlp", None)
    parts = {name: getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")}
    missing = [name for name, module in parts.items() if not isinstance(module, nn.Module)]
    if missing:
        raise TypeError(
            f"decoder layer {type(layer).__name__} has no gated MLP (missing mlp.{', mlp.'.join(missing)}); "
            "LAFN needs down_proj(act_fn(gate_proj(x)) * up_proj(x))"
        )
    return MlpParts(**{name: module for name, module in parts.items() if isinstance(module, nn.Module)})


EDIT_LAYERS_ATTR = "lafn_edit_layers"  # a checkpoint's own choice, kept in its config.json


def default_edit_layers(config: Any) -> tuple[int, ...]:
    """Default edit layers: the config's ``lafn_edit_layers`` when the checkpoint names them, else
    ``num_edit_layers`` consecutive layers from ``edit_start_fraction``.

    LLaMA2-7b (32 layers) gives (10, 11, 12) and Qwen1.5-7b gives (14, 15, 16), as in the paper.
    Shallow models are clamped so every index is valid.
    """
    pinned = getattr(text_config(config), EDIT_LAYERS_ATTR, None)
    if pinned is not None:
        if not isinstance(pinned, (list, tuple)) or not pinned or not all(isinstance(i, int) for i in pinned):
            raise ValueError(f"config.{EDIT_LAYERS_ATTR} must be a non-empty list of layer indices, got {pinned!r}")
        return tuple(sorted(set(pinned)))
    spec = get_spec(config)
    depth = int(text_config(config).num_hidden_layers)
    count = min(spec.num_edit_layers, depth)
    start = min(round(spec.edit_start_fraction * depth), depth - count)
    return tuple(range(start, start + count))
