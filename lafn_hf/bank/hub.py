"""Banks on the Hugging Face Hub: download a bank repo's files, push a bank (``save_bank`` into a temporary
folder, then one upload that replaces older weights files)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download

from .base_model import BaseModelRef
from .entries import EditBank
from .lafn_config import BANK_CONFIG_NAME, BANK_WEIGHTS_NAME
from .store import MODEL_CARD_NAME, save_bank

logger = logging.getLogger(__name__)

BANK_DOWNLOAD_PATTERNS = (BANK_CONFIG_NAME, MODEL_CARD_NAME, BANK_WEIGHTS_NAME, "lafn_bank-*.safetensors")


def resolve_bank_dir(name_or_path: str | os.PathLike[str], revision: str | None = None,
                     token: str | None = None) -> Path:
    """A local bank directory, or a Hub repo id downloaded with ``snapshot_download`` (bank files only)."""
    local = Path(name_or_path)
    if local.is_dir():
        return local
    return Path(snapshot_download(str(name_or_path), revision=revision, token=token,
                                  allow_patterns=list(BANK_DOWNLOAD_PATTERNS)))


def is_bank_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a ``lafn_config.json`` (of any kind: loading refuses one that is not a regular file)."""
    return os.path.lexists(Path(path) / BANK_CONFIG_NAME)


def warn_if_local_base(base: BaseModelRef) -> None:
    """Log a warning when the bank names its base model by a local path (it will not load elsewhere)."""
    if not base.is_hub_id:
        where = f"is the local path {base.name_or_path!r}" if base.name_or_path else "is not named"
        logger.warning("the bank's base model %s, so the bank will not load on other machines; pass "
                       "base_model='org/name' (or 'org/name@revision') to record its Hub id", where)


def push_bank(repo_id: str, bank: EditBank, base: BaseModelRef, *, private: bool | None = None,
              token: str | None = None, revision: str | None = None, commit_message: str | None = None) -> str:
    """Create the repo if needed and upload the bank folder (replacing older weights files); returns the
    commit URL. Warns when ``base`` is a local path."""
    warn_if_local_base(base)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as folder:
        save_bank(Path(folder) / "bank", bank, base)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(Path(folder) / "bank"), repo_type="model",
                                 revision=revision, delete_patterns=["lafn_bank*.safetensors"],
                                 commit_message=commit_message or f"Upload LAFN edit bank ({len(bank)} edits)")
    return str(info)
