"""Save, load and share edit banks: safetensors + JSON naming the base model, like a peft adapter.

Files: ``lafn_bank.safetensors`` (``{id}/{layer}/neurons`` int64 and ``{id}/{layer}/delta``
float32), ``lafn_config.json`` (format and library version, base model reference, entries'
metadata) and a ``README.md`` model card.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lafn_hf.modeling import decoder_layers, get_spec, text_config

from .bank import BankEntry, EditBank, LayerUpdate

BANK_WEIGHTS_NAME = "lafn_bank.safetensors"
BANK_CONFIG_NAME = "lafn_config.json"
MODEL_CARD_NAME = "README.md"
FORMAT_VERSION = 1
_BANK_FILES = (BANK_WEIGHTS_NAME, BANK_CONFIG_NAME, MODEL_CARD_NAME)


def library_version() -> str:
    try:
        return version("lafn-hf")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class BaseModelRef:
    """The base model a bank was made for: hub id (or path), revision and the shapes that must match."""

    name_or_path: str
    revision: str | None
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int

    @classmethod
    def from_model(cls, model: nn.Module, revision: str | None = None) -> BaseModelRef:
        config: Any = model.config
        text = text_config(config)
        return cls(
            name_or_path=str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")),
            revision=revision or getattr(config, "_commit_hash", None),
            model_type=get_spec(config).model_type,
            hidden_size=int(text.hidden_size),
            intermediate_size=int(text.intermediate_size),
            num_hidden_layers=len(decoder_layers(model)),
        )

    def check_compatible(self, other: BaseModelRef) -> None:
        """``ValueError`` naming every field that differs (model_type and sizes; not the id)."""
        fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")
        diffs = [f"{f}: bank has {getattr(self, f)!r}, model has {getattr(other, f)!r}" for f in fields
                 if getattr(self, f) != getattr(other, f)]
        if diffs:
            raise ValueError(
                f"this edit bank was made for {self.name_or_path!r} and does not fit the model: " + "; ".join(diffs)
            )


def save_bank(directory: str | os.PathLike[str], bank: EditBank, base: BaseModelRef) -> Path:
    """Write the bank atomically: a temporary sibling directory is filled, then swapped in.

    Other files already in ``directory`` are kept; if anything fails, the old directory is intact.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if target.is_dir():
            for item in target.iterdir():
                if item.name not in _BANK_FILES:
                    _copy(item, staging / item.name)
        _write_bank_files(staging, bank, base)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _copy(source: Path, destination: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, destination, symlinks=True)
    else:
        shutil.copy2(source, destination, follow_symlinks=False)


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(retired)
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _write_bank_files(directory: Path, bank: EditBank, base: BaseModelRef) -> None:
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for entry in bank:
        for layer, update in entry.updates.items():
            tensors[f"{entry.id}/{layer}/neurons"] = update.neurons.detach().cpu().contiguous()
            tensors[f"{entry.id}/{layer}/delta"] = update.delta.detach().cpu().contiguous()
        entries.append({"id": entry.id, "subjects": entry.subjects, "layers": list(entry.layers),
                        "metadata": entry.metadata})
    config = {
        "format_version": FORMAT_VERSION,
        "library": "lafn-hf",
        "library_version": library_version(),
        "base_model": asdict(base),
        "entries": entries,
    }
    save_file(tensors, str(directory / BANK_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / BANK_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    (directory / MODEL_CARD_NAME).write_text(model_card(bank, base), encoding="utf-8")


def model_card(bank: EditBank, base: BaseModelRef) -> str:
    """A Hub model card listing the edits."""
    lines = [
        "---",
        f"base_model: {base.name_or_path}" if base.name_or_path else "base_model: null",
        "library_name: lafn-hf",
        "pipeline_tag: text-generation",
        "tags:",
        "- lafn",
        "- knowledge-editing",
        "---",
        "",
        f"# LAFN edit bank for `{base.name_or_path}`",
        "",
        f"{len(bank)} multilingual edit(s) made with [lafn-hf](https://pypi.org/project/lafn-hf/) "
        "(Language-Agnostic Factual Neurons, arXiv 2406.16416). Base weights are unchanged; load with",
        "",
        "```python",
        "from lafn_hf import EditableCausalLM",
        'model = EditableCausalLM.from_pretrained("<this repo>")',
        "```",
        "",
        "| id | subjects | new answers | layers |",
        "| --- | --- | --- | --- |",
    ]
    for entry in bank:
        subjects = ", ".join(f"{lang}: {s}" for lang, s in entry.subjects.items())
        targets = entry.metadata.get("targets", {})
        answers = ", ".join(f"{lang}: {t}" for lang, t in targets.items()) if isinstance(targets, dict) else ""
        cells = [entry.id, subjects, answers, ", ".join(map(str, entry.layers))]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def load_bank(directory: str | os.PathLike[str]) -> tuple[EditBank, BaseModelRef]:
    """Read a bank directory; any inconsistency raises ``ValueError`` naming the file."""
    directory = Path(directory)
    config_path, weights_path = directory / BANK_CONFIG_NAME, directory / BANK_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{directory} is not an edit bank: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        base = BaseModelRef(**config["base_model"])
        raw_entries = list(config["entries"])
        format_version = int(config["format_version"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config_path} is not a valid lafn_config.json: {error}") from error
    if format_version > FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {format_version}; this lafn-hf reads <= {FORMAT_VERSION}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path} is corrupted or truncated: {error}") from error
    bank = EditBank()
    for raw in raw_entries:
        bank.add(_entry_from(raw, tensors, base, weights_path))
    return bank, base


def _entry_from(raw: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelRef, path: Path) -> BankEntry:
    try:
        updates = {}
        for layer in raw["layers"]:
            update = LayerUpdate(tensors[f"{raw['id']}/{layer}/neurons"], tensors[f"{raw['id']}/{layer}/delta"])
            if update.neurons.numel() and int(update.neurons.max()) >= base.intermediate_size:
                raise ValueError(f"neuron index >= intermediate_size {base.intermediate_size}")
            if not 0 <= int(layer) < base.num_hidden_layers:
                raise ValueError(f"layer {layer} outside the base model's {base.num_hidden_layers} layers")
            updates[int(layer)] = update
        return BankEntry(subjects=raw["subjects"], updates=updates, metadata=raw.get("metadata", {}), id=raw["id"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: entry {raw.get('id')!r} is inconsistent: {error!r}") from error


def resolve_bank_dir(name_or_path: str | os.PathLike[str], revision: str | None = None,
                     token: str | None = None) -> Path:
    """A local bank directory, or a Hub repo id downloaded with ``snapshot_download``."""
    local = Path(name_or_path)
    if local.is_dir():
        return local
    return Path(snapshot_download(str(name_or_path), revision=revision, token=token, allow_patterns=list(_BANK_FILES)))


def is_bank_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / BANK_CONFIG_NAME).is_file()


def push_bank(repo_id: str, bank: EditBank, base: BaseModelRef, *, private: bool | None = None,
              token: str | None = None, revision: str | None = None, commit_message: str | None = None) -> str:
    """Create the repo if needed and upload the bank folder; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as folder:
        save_bank(Path(folder) / "bank", bank, base)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(Path(folder) / "bank"),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload LAFN edit bank ({len(bank)} edits)",
        )
    return str(info)
