"""The server's bank set against crafted banks (issue 37): the admin route answers 400 at once and keeps the bank set;
a reload reads from disk outside the lock, so loading and removing banks never wait for it."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lafn_hf import EditableCausalLM, EditBank  # noqa: E402
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME  # noqa: E402
from lafn_hf.bank.store import save_bank  # noqa: E402
from lafn_hf.serve import ServerThread, build_app, load_editable  # noqa: E402
from lafn_hf.serve import banks as banks_module  # noqa: E402
from lafn_hf.serve.banks import BankSet  # noqa: E402

from .conftest import make_entry, weights_file  # noqa: E402
from .crafting import SUBJECT_PROMPT, narrowed, rewrite_config, rewrite_weights, routed_bank  # noqa: E402

BASE = "tiny"


def post(thread: ServerThread, path: str, body: dict[str, Any], token: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(thread.url + path, method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def one_entry_bank(directory: Path, editable: EditableCausalLM, subject: str, seed: int) -> Path:
    save_bank(directory, EditBank([make_entry({"en": subject}, size=256, seed=seed)]), editable.base_ref)
    return directory


def crafted_banks(root: Path, editable: EditableCausalLM) -> dict[str, tuple[Path, str]]:
    """Banks that once got in (issue 37), each with a part of the error the admin route must answer."""
    banks: dict[str, tuple[Path, str]] = {}

    def bank(name: str, message: str) -> Path:
        directory = one_entry_bank(root / name, editable, "Marbrafi", seed=1)
        banks[name] = (directory, message)
        return directory

    narrow = root / "narrow"
    save_bank(narrow, routed_bank(64), editable.base_ref)
    rewrite_weights(narrow, narrowed(("key_vectors", "space_means", "space_scales"), 63))
    banks["narrow"] = (narrow, "space_means has 63 columns, base_model.hidden_size is 64")
    rewrite_config(bank("long", "subjects.en has 27000 characters"),
                   lambda config: config["entries"][0].__setitem__("subjects", {"en": "Marbrafi " * 3000}))
    rewrite_config(bank("common", "subjects.en is refused: it is one of the most frequent function words"),
                   lambda config: config["entries"][0].__setitem__("subjects", {"en": "the"}))
    config = bank("nan", "is not strict JSON: it holds NaN") / BANK_CONFIG_NAME
    config.write_text(config.read_text().replace('"targets"', '"score": NaN, "targets"'))
    fifo = weights_file(bank("fifo", "is not a regular file (a FIFO)"))
    fifo.unlink()
    os.mkfifo(fifo)
    return banks


@pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform == "win32", reason="needs FIFOs")
def test_crafted_banks_posted_to_the_admin_route_are_a_400_and_change_nothing(tmp_path: Path) -> None:
    editable = load_editable("tiny-bilingual")  # here only to write the banks for its base model
    good = one_entry_bank(tmp_path / "good", editable, "Marbrafi", seed=1)
    crafted = crafted_banks(tmp_path, editable)
    built = build_app("tiny-bilingual", BASE, [("good", good)], admin=True)
    assert built.admin is not None
    token = built.admin.token
    with ServerThread(built.app) as thread:
        before = complete(thread, f"{BASE}+good")
        for name, (path, message) in crafted.items():
            started = time.perf_counter()
            status, error = post(thread, "/lafn/banks", {"path": str(path), "name": name}, token)
            took = time.perf_counter() - started
            assert status == 400 and message in error["detail"], (name, status, error)
            assert took < 1.0, (name, took)
            assert listing(thread, token)["models"] == [BASE, f"{BASE}+good"], name
            assert complete(thread, f"{BASE}+good") == before, name  # the model still answers, with its banks
    built.shutdown()


def listing(thread: ServerThread, token: str) -> Any:
    request = urllib.request.Request(thread.url + "/lafn/banks", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def complete(thread: ServerThread, model: str) -> str:
    status, body = post(thread, "/v1/completions", {"model": model, "prompt": SUBJECT_PROMPT, "max_tokens": 6,
                                                     "temperature": 0})
    assert status == 200, body
    return str(body["choices"][0]["text"])


def test_reload_reads_outside_the_lock_so_load_and_remove_do_not_wait(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    editable = load_editable("tiny-bilingual")
    banks = BankSet(editable)
    paths = {name: one_entry_bank(tmp_path / name, editable, subject, seed)
             for name, subject, seed in (("a", "Marbrafi", 1), ("b", "Lunvalfiland", 2), ("c", "Eiffelturm", 3))}
    banks.load_many([("a", paths["a"]), ("b", paths["b"])])
    reading, release = threading.Event(), threading.Event()
    real_load = banks_module.load_bank

    def slow_load(path: Path) -> Any:  # a large bank: reading and hashing it takes a while
        if Path(path) == paths["a"]:
            reading.set()
            release.wait(10)
        return real_load(path)

    monkeypatch.setattr(banks_module, "load_bank", slow_load)
    result: list[Any] = []
    reloader = threading.Thread(target=lambda: result.append(banks.reload(["a", "b"])))
    reloader.start()
    assert reading.wait(10)
    started = time.perf_counter()
    banks.load("c", paths["c"])
    banks.remove("b")  # removed while the reload reads it: the reload does not bring it back
    waited = time.perf_counter() - started
    release.set()
    reloader.join(10)
    assert waited < 1.0, waited
    assert [loaded.name for loaded in result[0]] == ["a"] and banks.names() == ("a", "c")
