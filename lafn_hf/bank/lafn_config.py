"""``lafn_config.json``, the bank directory's header: the names of its files, the format versions, and the
strict check of the file on load (every problem a ``ValueError`` naming the JSON path, what was expected and
what was found)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import format as bank_format
from .base_model import BaseModelRef
from .entries import _ENTRY_ID

logger = logging.getLogger(__name__)

BANK_WEIGHTS_NAME = "lafn_bank.safetensors"  # format 1; formats 2 and 3 name the file after its sha256
BANK_CONFIG_NAME = "lafn_config.json"
FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
WEIGHTS_FILE = re.compile(r"^lafn_bank-[0-9a-f]{16}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def library_version() -> str:
    try:
        return version("lafn-hf")
    except PackageNotFoundError:
        return "0+unknown"


def weights_name(sha256: str) -> str:
    """The content-addressed weights file name for a file whose sha256 is ``sha256``."""
    return f"lafn_bank-{sha256[:16]}.safetensors"


@dataclass(frozen=True)
class BankConfig:
    """A checked ``lafn_config.json``; ``entries`` hold ``id``, ``subjects``, ``metadata`` and (formats 1 and 2,
    where the config lists them) sorted ``layers``."""

    format_version: int
    base: BaseModelRef
    weights_file: str
    weights_sha256: str | None  # None in format 1
    entries: tuple[dict[str, Any], ...]


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
                             lambda v: isinstance(v, str) and bool(WEIGHTS_FILE.match(v)))
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
