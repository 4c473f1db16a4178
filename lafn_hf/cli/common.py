"""What every ``lafn`` command shares: loading a model by name, the config options, greedy text for the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import LafnConfig
from ..models import TINY_MODEL, tiny_model_path


def load_model(name: str, dtype: str = "auto", device: str = "auto") -> Any:
    """``name``: a shipped asset (tiny-bilingual), an offline model (gemma-3-270m, ...), a path or a Hub id.

    ``dtype`` "auto" loads float32 on CPU and the checkpoint's dtype on GPU; ``device`` "auto" is CUDA when
    available. Says on stderr what it loaded.
    """
    import torch

    from ..model import EditableCausalLM
    from ..models import OFFLINE_MODELS, load_dtype, materialize

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = load_dtype(dtype, device)
    if name == TINY_MODEL:
        path: str = str(tiny_model_path())
    elif name in OFFLINE_MODELS:
        path = str(materialize(name))
    else:
        path = name
    model = EditableCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device)
    parameter = next(model.parameters())
    print(f"lafn: loaded {name} in {parameter.dtype} on {parameter.device} (--dtype, --device to change)",
          file=sys.stderr)
    return model


def generate_text(model: Any, prompt: str, new_tokens: int = 8) -> str:
    """The greedy continuation of ``prompt``, special tokens and Gemma's image markers left out, on one line."""
    encoded = model.tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False)
    text = model.tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.replace("<start_of_image>", "").split())


def config_from_args(args: argparse.Namespace) -> LafnConfig:
    """``--config`` (a LafnConfig JSON) with ``--layers`` and ``--subject-search`` over it."""
    config = LafnConfig.from_json(Path(args.config).read_text("utf-8")) if args.config else LafnConfig()
    if getattr(args, "subject_search", None):
        config = LafnConfig.from_dict({**config.to_dict(), "subject_search": args.subject_search})
    if args.layers:
        config = LafnConfig.from_dict({**config.to_dict(), "layers": [int(x) for x in args.layers.split(",")]})
    return config


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="LafnConfig JSON (keys as LafnConfig's fields; unknown keys are dropped)")
    parser.add_argument("--layers", help="comma-separated layer indices (default: the modeling/ table's)")


def add_model_options(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None,
                      help: str = f"a local folder, a Hub id, gemma-3-270m / smollm2-135m (offline) or {TINY_MODEL}"
                      ) -> None:
    from ..models import DTYPES

    parser.add_argument("--model", required=required, default=default, help=help)
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights dtype (default auto: float32 on CPU, where bf16 edits are ~20x slower; the "
                        "checkpoint's dtype on GPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps... (default: cuda if available)")
