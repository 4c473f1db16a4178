"""A bank a server serves, saved again into a directory that turns read-only at each step of the save in turn
(issue 35, item 3): the save fails with the errno (and the path, where the failing call had one) and the directory
keeps the old bank (what the save wrote and could not remove, removing being refused too, stays until the next
complete save), or, refused after the commit point, the new bank is saved; a reload serves what is there. (A full
disk at every write is ``tests/test_hub_crashes.py``'s ENOSPC test; a save killed at every step its kill test.)"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from lafn_hf import EditBank  # noqa: E402
from lafn_hf.bank.store import load_bank, save_bank  # noqa: E402
from lafn_hf.serve import BankSet, load_editable  # noqa: E402

from .conftest import make_entry  # noqa: E402

WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def old_weights(before: dict[str, bytes]) -> str:
    return next(name for name in before if name.startswith("lafn_bank-"))


def new_weights(target: Path) -> str:
    return next(path.name for path in target.iterdir() if path.name.startswith("lafn_bank-"))


def read_only(error_number: int, calls: list[str], start: int) -> Callable[..., Callable[..., Any]]:
    """Wrap an ``os`` function so that, from the ``start``-th call that changes the file system on (the file system
    turned read-only mid-save), each such call fails with ``error_number``."""
    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            if name != "open" or (len(args) > 1 and args[1] & WRITES):
                calls.append(name)
                if len(calls) >= start:  # the kernel's error: with the path for path calls, none for fd calls
                    if isinstance(args[0], int):
                        raise OSError(error_number, os.strerror(error_number))
                    raise OSError(error_number, os.strerror(error_number), os.fspath(args[0]))
            return real(*args, **kwargs)
        return refuse
    return wrap


@pytest.mark.parametrize("error_number", [errno.EROFS, errno.EACCES])
def test_a_save_into_a_read_only_directory_keeps_the_served_bank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  error_number: int) -> None:
    editable = load_editable("tiny-bilingual")
    old, new = (EditBank([make_entry({"en": subject}, size=256, seed=seed)]) for subject, seed in
                (("Marbrafi", 1), ("Lunvalfiland", 2)))
    target = tmp_path / "bank"
    save_bank(target, old, editable.base_ref)
    banks = BankSet(editable)
    banks.load("live", target)
    before = files(target)
    left_behind = tidied_late = 0
    for start in range(1, 100):
        calls: list[str] = []
        wrap = read_only(error_number, calls, start)
        with monkeypatch.context() as patch:
            for name in ("open", "mkdir", "replace", "rename", "unlink", "rmdir", "write", "fsync"):
                patch.setattr(os, name, wrap(name, getattr(os, name)))
            try:
                save_bank(target, new, editable.base_ref)
            except OSError as error:
                assert error.errno == error_number, (start, error)
                # names the path it could not write, where the failing call had one (a write() or fsync() has none)
                assert error.filename is None or str(target) in str(error), (start, str(error))
                # the old bank's files as they were; what the save wrote and could not remove (refused too) stays
                now = files(target)
                assert {name: now.get(name) for name in before} == before, start
                assert all(name.startswith((".lafn-tmp-", "lafn_bank-")) for name in set(now) - set(before)), start
                left_behind += bool(set(now) - set(before))
                assert [entry.subjects for entry in load_bank(target)[0]] == [{"en": "Marbrafi"}], start
                banks.reload()  # what a server reloads from there now
                assert [entry.subjects for entry in banks.get("live").bank] == [{"en": "Marbrafi"}], start
                continue
        assert [entry.subjects for entry in load_bank(target)[0]] == [{"en": "Lunvalfiland"}], start
        if len(calls) < start:
            break  # a save without a refusal: every call was refused once before
        tidied_late += 1  # refused after the commit point (tidying up): the new bank is saved, and says so
        save_bank(target, old, editable.base_ref)
        before = files(target)
    assert start > 5, start
    assert [entry.subjects for entry in load_bank(target)[0]] == [{"en": "Lunvalfiland"}]
    assert set(files(target)) == set(before) - {old_weights(before)} | {new_weights(target)}  # nothing left behind
    assert left_behind > 0 and tidied_late > 0, (left_behind, tidied_late)
    save_bank(target, old, editable.base_ref)
    banks.reload()
    assert [entry.subjects for entry in banks.get("live").bank] == [{"en": "Marbrafi"}]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_save_into_a_really_read_only_directory(tmp_path: Path) -> None:
    target = tmp_path / "bank"
    base = load_editable("tiny-bilingual").base_ref
    save_bank(target, EditBank([make_entry({"en": "Marbrafi"}, size=256, seed=1)]), base)
    before = files(target)
    target.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError, match=str(target)):
            save_bank(target, EditBank([make_entry({"en": "Lunvalfiland"}, size=256, seed=2)]), base)
    finally:
        target.chmod(0o755)
    assert files(target) == before
