"""Save, load and share edit banks: safetensors + JSON naming the base model, like a peft adapter.

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
import tempfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import save as save_safetensors
from torch import nn

from lafn_hf.modeling import decoder_layers, get_spec, text_config

from . import files as bank_file
from . import format as bank_format
from .checks import check_surface_forms
from .entries import _ENTRY_ID, EditBank

logger = logging.getLogger(__name__)

BANK_WEIGHTS_NAME = "lafn_bank.safetensors"  # format 1; formats 2 and 3 name the file after its sha256
BANK_CONFIG_NAME = "lafn_config.json"
MODEL_CARD_NAME = "README.md"
FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
MODEL_CARD_ROWS = 1000  # entries listed in the model card; lafn_config.json lists them all
BANK_DOWNLOAD_PATTERNS = (BANK_CONFIG_NAME, MODEL_CARD_NAME, BANK_WEIGHTS_NAME, "lafn_bank-*.safetensors")
_WEIGHTS_FILE = re.compile(r"^lafn_bank-[0-9a-f]{16}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")


def library_version() -> str:
    try:
        return version("lafn-hf")
    except PackageNotFoundError:
        return "0+unknown"


def weights_name(sha256: str) -> str:
    """The content-addressed weights file name for a file whose sha256 is ``sha256``."""
    return f"lafn_bank-{sha256[:16]}.safetensors"


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
        ours = name.startswith(bank_file.TEMP_PREFIX) or name == BANK_WEIGHTS_NAME or bool(_WEIGHTS_FILE.match(name))
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
@dataclass(frozen=True)
class BankConfig:
    """A checked ``lafn_config.json``; ``entries`` hold ``id``, ``subjects``, ``metadata`` and (formats 1 and 2,
    where the config lists them) sorted ``layers``."""

    format_version: int
    base: BaseModelRef
    weights_file: str
    weights_sha256: str | None  # None in format 1
    entries: tuple[dict[str, Any], ...]


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


def parse_bank_config(data: bytes | str, source: str = BANK_CONFIG_NAME) -> BankConfig:
    """Parse and check ``lafn_config.json``; any problem is a ``ValueError`` naming ``source`` and the field."""
    try:
        raw = json.loads(data, parse_constant=_refuse_constant)
    except _NotStrict as error:
        raise ValueError(f"{source} is not strict JSON: it holds {error.args[0]} (metadata must be plain JSON)") from None
    except RecursionError:
        raise ValueError(f"{source} is not valid JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, integers too long to convert
        raise ValueError(f"{source} is not valid JSON: {error}") from None
    try:
        return _check_config(raw)
    except ValueError as error:
        raise ValueError(f"{source} is not a valid {BANK_CONFIG_NAME}: {error}") from None


class _NotStrict(Exception):
    """A NaN or Infinity literal, which Python's ``json`` accepts and strict JSON does not."""


def _refuse_constant(literal: str) -> Any:
    raise _NotStrict(literal)


_REQUIRED: Any = object()


def _show(value: Any) -> str:
    kind = {dict: "object", list: "array", str: "string", bool: "", type(None): ""}.get(type(value), "number")
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (dict, list)) else repr(value)
    return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}".strip()


def _take(obj: dict[str, Any], key: str, where: str, expected: str, ok: Callable[[Any], bool],
          default: Any = _REQUIRED) -> Any:
    field = f"{where}.{key}" if where else key
    if key not in obj:
        if default is not _REQUIRED:
            return default
        raise ValueError(f"{field} is missing")
    if not ok(obj[key]):
        raise ValueError(f"{field} must be {expected}, got {_show(obj[key])}")
    return obj[key]


def _is_int(value: Any, minimum: int | None = None) -> bool:
    return type(value) is int and (minimum is None or value >= minimum)  # not bool, not float


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, got {_show(value)}")
    return value


def _check_config(raw: Any) -> BankConfig:
    top = _object(raw, "the top level")
    supported = ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
    fmt = _take(top, "format_version", "", f"an integer ({supported})", _is_int)
    if fmt > max(SUPPORTED_FORMAT_VERSIONS):
        raise ValueError(f"format_version {fmt} was written by a newer lafn-hf; this one reads {supported}")
    if fmt not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"format_version must be one of {supported}, got {fmt}")
    known = {"format_version", "library", "library_version", "base_model", "entries"}
    for key in ("library", "library_version"):
        _take(top, key, "", "a string", lambda v: isinstance(v, str), default=None)
    base = _base_model(_take(top, "base_model", "", "an object", lambda v: isinstance(v, dict)))
    sha: str | None = None
    weights_file = BANK_WEIGHTS_NAME
    if fmt >= 2:
        known |= {"weights_file", "weights_sha256"}
        sha = _take(top, "weights_sha256", "", "64 lowercase hex digits",
                    lambda v: isinstance(v, str) and bool(_SHA256.match(v)))
        weights_file = _take(top, "weights_file", "", "'lafn_bank-<16 hex digits>.safetensors'",
                             lambda v: isinstance(v, str) and bool(_WEIGHTS_FILE.match(v)))
        if sha is not None and weights_file != weights_name(sha):
            raise ValueError(f"weights_file {weights_file!r} does not match weights_sha256 (expected {weights_name(sha)!r})")
    raw_entries = _take(top, "entries", "", "an array", lambda v: isinstance(v, list))
    entries: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, raw_entry in enumerate(raw_entries):
        if fmt >= 3 and bank_format.is_plain_entry(raw_entry):  # the common case, checked fast (1M entries: about 1 s)
            entry = raw_entry
            entry.setdefault("metadata", {})
        else:
            entry = _entry_fields(raw_entry, f"entries[{index}]", base, fmt)
        if entry["id"] in seen:
            raise ValueError(f"entries[{index}].id {entry['id']!r} is already used by entries[{seen[entry['id']]}]")
        seen[entry["id"]] = index
        entries.append(entry)
    unknown = sorted(set(top) - known)
    if unknown:
        logger.warning("%s has fields this lafn-hf does not know (ignored): %s", BANK_CONFIG_NAME, unknown)
    return BankConfig(fmt, base, weights_file, sha, tuple(entries))


def _base_model(raw: dict[str, Any]) -> BaseModelRef:
    def text(key: str, expected: str, ok: Callable[[Any], bool]) -> Any:
        return _take(raw, key, "base_model", expected, ok)

    return BaseModelRef(
        name_or_path=text("name_or_path", "a string", lambda v: isinstance(v, str)),
        revision=text("revision", "a string or null", lambda v: v is None or isinstance(v, str)),
        model_type=text("model_type", "a non-empty string", lambda v: isinstance(v, str) and bool(v)),
        hidden_size=text("hidden_size", "a positive integer", lambda v: _is_int(v, 1)),
        intermediate_size=text("intermediate_size", "a positive integer", lambda v: _is_int(v, 1)),
        num_hidden_layers=text("num_hidden_layers", "a positive integer", lambda v: _is_int(v, 1)),
    )


def _entry_fields(raw: Any, where: str, base: BaseModelRef, fmt: int) -> dict[str, Any]:
    obj = _object(raw, where)
    entry_id = _take(obj, "id", where, "a string of 1-64 letters, digits, _ or -",
                     lambda v: isinstance(v, str) and bool(_ENTRY_ID.match(v)))
    subjects = _take(obj, "subjects", where, "an object mapping languages to non-empty strings",
                     lambda v: isinstance(v, dict) and bool(v) and all(isinstance(s, str) and s.strip() for s in v.values()))
    metadata = _take(obj, "metadata", where, "an object", lambda v: isinstance(v, dict), default={})
    if fmt >= 3:  # the layers are in the weights file
        row = {"id": entry_id, "subjects": subjects, "metadata": metadata}
        if "aliases" in obj:
            row["aliases"] = list(_take(obj, "aliases", where, "an array of distinct non-empty NFC strings",
                                        bank_format._plain_aliases))
        return row
    layers = _take(obj, "layers", where, "a non-empty array of distinct integers",
                   lambda v: isinstance(v, list) and bool(v) and all(map(_is_int, v)) and len(set(v)) == len(v))
    outside = [layer for layer in layers if not 0 <= layer < base.num_hidden_layers]
    if outside:
        raise ValueError(f"{where}.layers: layer {outside[0]} is out of range for base_model.num_hidden_layers "
                         f"{base.num_hidden_layers}")
    return {"id": entry_id, "subjects": subjects, "layers": sorted(layers), "metadata": metadata}


# -- the Hub -----------------------------------------------------------------------------------------
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
