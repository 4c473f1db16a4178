"""Save and load edit banks in a directory: safetensors + JSON naming the base model, like a peft adapter.

Files: ``lafn_bank-<first 16 hex digits of its sha256>.safetensors`` (format 3: five tensors for the whole
bank, see ``lafn_hf.bank.format``), ``lafn_config.json`` (format and library version, the weights file's name
and full sha256, the base model reference, the entries in order: id, subjects, metadata) and a ``README.md``
model card.

Formats: 1 (``lafn_bank.safetensors``, two tensors per entry and layer, no checksum), 2 (the same tensors,
content-addressed file and sha256) and 3 load; saving always writes 3. Migration rule: a bank of format 1 or
2 stays as it is until the next save into its directory, which rewrites it as format 3 (same entries, ids,
subjects, metadata and bit-identical tensors) and deletes the old weights file. lafn-hf versions that write
format 2 refuse format 3 ("written by a newer lafn-hf").

Loading checks the sha256, then memory-maps a format-3 weights file (POSIX): loaded deltas are views of the
mapping, neuron indices an int64 copy (details in ``lafn_hf.bank.format``).

Saving never removes the directory. Each file is written to a temporary file inside it, flushed, fsynced
and renamed over its final name: first the weights (a new, content-addressed name, so the old bank's file
is untouched), then the model card (written, not yet renamed), then ``lafn_config.json``, whose rename is
the commit point; after it only renames and deletions follow (the card renamed into place, weights no
longer referenced and what crashed saves left behind deleted), which cannot fill a disk and, should they
fail, are logged, not raised. After a crash at any point the directory holds the old bank or the new one;
an error (a full disk) means the old bank, untouched; success means the new bank with its card.
"""


from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save as save_safetensors

from . import files as bank_file
from . import format as bank_format
from .base_model import BaseModelRef
from .checks import check_surface_forms
from .entries import EditBank
from .lafn_config import (
    BANK_CONFIG_NAME,
    BANK_WEIGHTS_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    library_version,
    parse_bank_config,
    weights_name,
)

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
MODEL_CARD_ROWS = 1000  # entries listed in the model card; lafn_config.json lists them all


# -- saving ------------------------------------------------------------------------------------------
def save_bank(directory: str | os.PathLike[str], bank: EditBank, base: BaseModelRef) -> Path:
    """Write the bank into ``directory`` so that a crash at any point leaves the old bank or the new one.

    Other files in the directory and its permissions are kept; new files get ``0o666 & ~umask``. A
    ``directory`` that is a regular file or a symlink is a ``ValueError``.
    """
    target = Path(directory)
    _check_target(target)
    with bank_format.paused_gc():
        tensors, entries = bank_format.encode(bank)
        weights = save_safetensors(tensors, metadata={"format": "pt"})
        sha = hashlib.sha256(weights).hexdigest()
        weights_file = weights_name(sha)
        config = bank_format.config_json({
            "format_version": FORMAT_VERSION, "library": "lafn-hf", "library_version": library_version(),
            "base_model": asdict(base), "weights_file": weights_file, "weights_sha256": sha}, entries)
    card = model_card(bank, base).encode("utf-8")
    target.mkdir(parents=True, exist_ok=True)
    with bank_file.locked_directory(target) as sync:
        existed = (target / weights_file).exists()
        card_file: Path | None = None
        try:
            bank_file.write_atomic(target, weights_file, weights)
            card_file = bank_file.write_temp(target, MODEL_CARD_NAME, card)  # written before the commit point
            sync()
            bank_file.write_atomic(target, BANK_CONFIG_NAME, config)  # the commit point
        except BaseException:
            if card_file is not None:
                with suppress(OSError):
                    card_file.unlink()
            if not existed and _referenced_weights(target) != weights_file:
                with suppress(OSError):
                    (target / weights_file).unlink()
            raise
        _after_commit(target, card_file, weights_file, sync)
    return target


def _after_commit(target: Path, card_file: Path, weights_file: str, sync: Callable[[], None]) -> None:
    """The new bank is saved: rename its card into place and delete what no longer belongs. Nothing here writes
    data, and a failure is logged, not raised: an error from ``save_bank`` means the old bank is untouched."""
    try:
        sync()
        os.replace(card_file, target / MODEL_CARD_NAME)
        sync()
        _remove_leftovers(target, weights_file)
    except OSError as error:
        logger.warning("%s: the new bank is saved, but tidying up after it failed (%s); the next save retries",
                       target, error.strerror or error)


def _check_target(target: Path) -> None:
    if target.is_symlink():
        raise ValueError(f"{target} is a symlink (to {os.readlink(target)}); refusing to save an edit bank through it: "
                         "pass the directory itself")
    if target.exists() and not target.is_dir():
        kind = "a regular file" if target.is_file() else "not a directory"
        raise ValueError(f"{target} is {kind}; an edit bank is a directory, refusing to replace it")


def _referenced_weights(directory: Path) -> str | None:
    try:
        return str(json.loads((directory / BANK_CONFIG_NAME).read_bytes()).get("weights_file"))
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _remove_leftovers(target: Path, keep: str) -> None:
    """Delete weights files other than ``keep``, our temporary files, and the staging/retired sibling
    directories that saves of lafn-hf <= 0.1 left when they crashed."""
    for path in target.iterdir():
        name = path.name
        ours = name.startswith(bank_file.TEMP_PREFIX) or name == BANK_WEIGHTS_NAME or bool(WEIGHTS_FILE.match(name))
        if ours and name != keep and (path.is_symlink() or not path.is_dir()):
            with suppress(FileNotFoundError):
                path.unlink()
    absolute = Path(os.path.abspath(target))
    old_staging = re.compile(rf"^\.{re.escape(absolute.name)}\.(tmp|old)-[a-z0-9_]{{8}}$")
    for path in absolute.parent.iterdir():
        if old_staging.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def model_card(bank: EditBank, base: BaseModelRef) -> str:
    """A Hub model card listing the edits (``base_model`` metadata only when it is a Hub id)."""
    revision = f" (revision `{base.revision}`)" if base.revision else ""
    lines = [
        "---", f"base_model: {base.name_or_path}" if base.is_hub_id else "base_model: null", "library_name: lafn-hf",
        "pipeline_tag: text-generation", "tags:", "- lafn", "- knowledge-editing", "---", "",
        f"# LAFN edit bank for `{base.name_or_path}`{revision}", "",
        f"{len(bank)} multilingual edit(s) made with [lafn-hf](https://pypi.org/project/lafn-hf/) "
        "(Language-Agnostic Factual Neurons, arXiv 2406.16416). Base weights are unchanged; load with", "",
        "```python", "from lafn_hf import EditableCausalLM", 'model = EditableCausalLM.from_pretrained("<this repo>")',
        "```", "", "| id | subjects | new answers | layers |", "| --- | --- | --- | --- |",
    ]
    entries = list(bank)
    for entry in entries[:MODEL_CARD_ROWS]:
        subjects = ", ".join(f"{lang}: {s}" for lang, s in entry.subjects.items())
        targets = entry.metadata.get("targets", {})
        answers = ", ".join(f"{lang}: {t}" for lang, t in targets.items()) if isinstance(targets, dict) else ""
        cells = [entry.id, subjects, answers, ", ".join(map(str, entry.layers))]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if len(entries) > MODEL_CARD_ROWS:
        lines += ["", f"... and {len(entries) - MODEL_CARD_ROWS} more (all in `{BANK_CONFIG_NAME}`)."]
    return "\n".join(lines) + "\n"


# -- loading -----------------------------------------------------------------------------------------
def load_bank(directory: str | os.PathLike[str], *, allow_common: bool = False) -> tuple[EditBank, BaseModelRef]:
    """Read a bank directory; any inconsistency raises ``ValueError`` naming the file and the field. Subjects and
    aliases pass the rule of ``edit()`` and ``add_aliases`` (``lafn_hf.bank.checks``): ``allow_common`` accepts
    short and function-word ones, as ``allow_common_subject`` does for an edit."""
    with bank_format.paused_gc():
        return _load_bank(Path(directory), allow_common)


def _load_bank(directory: Path, allow_common: bool) -> tuple[EditBank, BaseModelRef]:
    config_path = directory / BANK_CONFIG_NAME
    for attempt in range(2):  # a save that commits meanwhile deletes the old weights: read its config then
        try:
            parsed = parse_bank_config(bank_file.read_regular(config_path), str(config_path))
        except FileNotFoundError:
            raise ValueError(f"{directory} is not an edit bank: {BANK_CONFIG_NAME} is missing") from None
        try:
            check_surface_forms(parsed.entries, allow_common)
        except ValueError as error:
            raise ValueError(f"{config_path} is not a valid {BANK_CONFIG_NAME}: {error}") from None
        weights_path = directory / parsed.weights_file
        try:
            tensors = bank_file.read_weights(weights_path, parsed.weights_sha256, BANK_CONFIG_NAME,
                                               mapped=parsed.format_version >= 3)
            break
        except FileNotFoundError:
            if attempt:
                raise ValueError(f"{directory} is not an edit bank: {parsed.weights_file} is missing") from None
    base = parsed.base
    try:
        if parsed.format_version >= 3:
            bank = bank_format.decode(parsed.entries, tensors, base.num_hidden_layers, base.intermediate_size,
                                     base.hidden_size)
        else:
            bank = bank_format.decode_per_entry(parsed.entries, tensors, base.intermediate_size)
    except ValueError as error:
        raise ValueError(f"{weights_path} does not match {BANK_CONFIG_NAME}: {error}") from None
    return bank, base
