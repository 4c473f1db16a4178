"""Banks crafted by hand, as a hostile bank author would: saved by lafn-hf, then changed on disk."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from lafn_hf import BankEntry, EditBank, LayerUpdate
from lafn_hf.bank.base_model import BaseModelRef
from lafn_hf.bank.entries import KeySpace, QuestionScope, RoutingKey, ScopeSpace
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME, BANK_WEIGHTS_NAME, weights_name

from .conftest import weights_file

SUBJECT_PROMPT = "The capital of Marbrafi is"
UNRELATED_PROMPT = "hello"


def unit_rows(generator: torch.Generator, rows: int, width: int) -> torch.Tensor:
    vectors = torch.randn(rows, width, generator=generator)
    return vectors / vectors.norm(dim=1, keepdim=True)


def routed_entry(hidden_size: int, entry_id: str = "e0", subject: str = "Marbrafi", seed: int = 0,
                 edit_layer: int = 1, neurons: int = 32, aliases: tuple[str, ...] = ()) -> BankEntry:
    """An entry with a routing key and a question scope read at layer 0 (hidden states of ``hidden_size``)."""
    generator = torch.Generator().manual_seed(seed)
    mean, scale = torch.randn(hidden_size, generator=generator), torch.rand(hidden_size, generator=generator) + 0.5
    key = RoutingKey(KeySpace(0, mean, scale), unit_rows(generator, 1, hidden_size)[0], 0.5)
    templates, relations = unit_rows(generator, 5, hidden_size), torch.tensor([0, 0, 1, 1, 2])
    own = unit_rows(generator, 2, hidden_size)
    update = LayerUpdate(torch.arange(0, 2 * neurons, 2), torch.randn(neurons, generator=generator))
    basis = torch.randn(3, hidden_size, generator=generator) if seed % 2 == 0 else None  # mixed bases in one bank
    scope = QuestionScope(ScopeSpace(0, mean.clone(), scale.clone(), templates, relations, basis), own, 0, 0.0)
    return BankEntry({"en": subject}, {edit_layer: update}, {"targets": {"en": "x"}}, id=entry_id, aliases=aliases,
                     key=key, scope=scope)


def routed_bank(hidden_size: int) -> EditBank:
    return EditBank([routed_entry(hidden_size), routed_entry(hidden_size, "e1", "Lunvalfiland", seed=1)])


def write_old_bank(directory: Path, bank: EditBank, base: BaseModelRef, version: int) -> Path:
    """A bank as lafn-hf wrote formats 1 and 2: two tensors per entry and layer, each entry's layers listed."""
    tensors = {f"{entry.id}/{layer}/{kind}": getattr(update, kind)
               for entry in bank for layer, update in entry.updates.items() for kind in ("neurons", "delta")}
    data = save_safetensors(tensors, metadata={"format": "pt"})
    config: dict[str, Any] = {
        "format_version": version, "library": "lafn-hf", "library_version": f"0.{version}.0", "base_model": asdict(base),
        "entries": [{"id": e.id, "subjects": e.subjects, "layers": list(e.layers), "metadata": e.metadata} for e in bank]}
    name = BANK_WEIGHTS_NAME
    if version == 2:
        sha = hashlib.sha256(data).hexdigest()
        name = weights_name(sha)
        config.update(weights_file=name, weights_sha256=sha)
    directory.mkdir(parents=True)
    (directory / name).write_bytes(data)
    (directory / BANK_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False))
    return directory


def rewrite_weights(directory: Path, mutate: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the stored tensors and re-sign them (new name and sha256), as a buggy writer would."""
    tensors = load_file(str(weights_file(directory)))
    mutate(tensors)
    sign_weights(directory, save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))


def sign_weights(directory: Path, data: bytes) -> None:
    """Make ``data`` the bank's weights file, under its content-addressed name, with its sha256 in the config."""
    sha = hashlib.sha256(data).hexdigest()
    weights_file(directory).unlink()
    (directory / weights_name(sha)).write_bytes(data)
    rewrite_config(directory, lambda config: config.update(weights_file=weights_name(sha), weights_sha256=sha))


def rewrite_config(directory: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    path = directory / BANK_CONFIG_NAME
    config = json.loads(path.read_text(encoding="utf-8"))
    mutate(config)
    path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def narrowed(names: tuple[str, ...], width: int) -> Callable[[dict[str, torch.Tensor]], None]:
    """Keep the first ``width`` columns of the tensors ``names`` (unit rows stay unit rows)."""
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        for name in names:
            cut = tensors[name][:, :width]
            unit = name in ("key_vectors", "scope_vectors", "scope_templates")
            tensors[name] = (cut / cut.norm(dim=1, keepdim=True) if unit else cut).contiguous()
    return mutate


def within(seconds: float, call: Callable[[], Any], unblock: Callable[[], None] = lambda: None) -> Any:
    """``call()``'s result or exception, failing the test when it takes longer than ``seconds`` (a hang)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            outcome.append(("error", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        pytest.fail(f"still running after {seconds} s")
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value
