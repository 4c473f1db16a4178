"""The base model a bank was made for: its Hub id (or local path), revision and the shapes that must match."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from lafn_hf.modeling import decoder_layers, get_spec, text_config

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a Hub repo id (``org/name`` or a legacy bare ``name``), not a filesystem path."""
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name and not os.path.isabs(name)


def parse_base_model(spec: str) -> tuple[str, str | None]:
    """``"org/name"`` or ``"org/name@revision"`` -> (repo id, revision); an existing local directory -> its
    absolute path (which only loads on this machine)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"base_model must be a non-empty str, got {spec!r}")
    if os.path.isdir(spec):
        return os.path.abspath(spec), None
    repo, sep, revision = spec.partition("@")
    if is_repo_id(repo) and (revision or not sep):
        return repo, revision or None
    raise ValueError(f"base_model must be a Hub id ('org/name' or 'org/name@revision') or an existing local "
                     f"directory, got {spec!r}")


def base_reference(config: Any) -> tuple[str, str | None]:
    """(Hub id or absolute path, revision) of the checkpoint ``config`` was loaded from.

    The Hub id is recorded whenever it is known: the id the model was loaded by, the repo of a Hugging Face
    cache snapshot folder (``models--org--name/snapshots/<commit>``) or ``lafn_hub_id`` in its config.json
    (``lafn_hf.models.materialize`` writes it); otherwise the folder's absolute path.
    """
    name = str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
    commit = getattr(config, "_commit_hash", None)
    if name and not os.path.isdir(name):
        return name, commit
    folder = Path(os.path.abspath(name)) if name else None
    if folder is not None and folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        repo = folder.parent.parent.name[len("models--"):].replace("--", "/")
        if is_repo_id(repo):
            return repo, folder.name
    hub_id = getattr(config, "lafn_hub_id", None)
    if isinstance(hub_id, str) and is_repo_id(hub_id):
        return hub_id, None
    return (str(folder) if folder is not None else ""), commit


@dataclass(frozen=True)
class BaseModelRef:
    """The base model a bank was made for: Hub id (or local path), revision and the shapes that must match."""

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
        name, found_revision = base_reference(config)
        return cls(name_or_path=name, revision=revision or found_revision, model_type=get_spec(config).model_type,
                   hidden_size=int(text.hidden_size), intermediate_size=int(text.intermediate_size),
                   num_hidden_layers=len(decoder_layers(model)))

    @property
    def is_hub_id(self) -> bool:
        """Whether the reference loads anywhere (a Hub id), not only on the machine that made the bank."""
        return is_repo_id(self.name_or_path)

    def with_base_model(self, base_model: str) -> BaseModelRef:
        """The same shapes under another name: ``"org/name"``, ``"org/name@revision"`` or a local directory."""
        name, revision = parse_base_model(base_model)
        return replace(self, name_or_path=name, revision=revision)

    def check_compatible(self, other: BaseModelRef) -> None:
        """``ValueError`` naming every field that differs (model_type and sizes; not the id)."""
        fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")
        diffs = [f"{f}: bank has {getattr(self, f)!r}, model has {getattr(other, f)!r}" for f in fields
                 if getattr(self, f) != getattr(other, f)]
        if diffs:
            raise ValueError(f"this edit bank was made for {self.name_or_path!r} and does not fit the model: "
                             + "; ".join(diffs))
