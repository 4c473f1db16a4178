"""A bank directory's files on disk: the weights file read with its sha256 checked (memory-mapped for format 3,
see ``lafn_hf.bank_format``); files written crash-safely (a temporary file, fsynced, renamed) under a lock on
the directory."""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors

TEMP_PREFIX = ".lafn-tmp-"  # our temporary files inside a bank directory


# -- the file --------------------------------------------------------------------------------------
def read_weights(path: Path, sha256: str | None, config_name: str, mapped: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` once its sha256 (when recorded) is checked; memory-mapped when ``mapped`` (not on
    Windows). ``FileNotFoundError`` when the file is gone or was replaced meanwhile (a concurrent save)."""
    with open(path, "rb") as handle:
        if mapped and sys.platform != "win32":
            if sha256 is not None:
                _check_sha256(path, _file_sha256(handle), sha256, config_name)
            try:
                with safe_open(str(path), framework="pt") as reader:
                    tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (not a dict)
            except (SafetensorError, OSError, ValueError, RuntimeError) as error:
                if not path.exists():
                    raise FileNotFoundError(path) from None
                raise ValueError(f"{path} is corrupted or truncated: {error}") from error
            hashed, now = os.fstat(handle.fileno()), os.stat(path)
            if (hashed.st_ino, hashed.st_dev) != (now.st_ino, now.st_dev):
                raise FileNotFoundError(path)  # not the file that was hashed
            return tensors
        data = handle.read()
    if sha256 is not None:
        _check_sha256(path, hashlib.sha256(data).hexdigest(), sha256, config_name)
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is corrupted or truncated: {error}") from error


def _file_sha256(handle: Any) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(1 << 20))
    while size := handle.readinto(buffer):
        digest.update(buffer[:size])
    return digest.hexdigest()


def _check_sha256(path: Path, actual: str, recorded: str, config_name: str) -> None:
    if actual != recorded:
        raise ValueError(f"{path} is corrupted or truncated: its sha256 is {actual}, {config_name} records {recorded}")


# -- writing ---------------------------------------------------------------------------------------------
@contextmanager
def locked_directory(target: Path) -> Iterator[Callable[[], None]]:
    """Hold an exclusive lock on ``target`` (POSIX; concurrent saves wait) and yield its fsync."""
    fd = -1
    if sys.platform != "win32":  # Windows cannot open directories: no lock, no directory fsync
        with suppress(OSError):
            fd = os.open(target, os.O_RDONLY)
    if fd < 0:
        yield lambda: None
        return
    import fcntl

    try:
        with suppress(OSError):  # e.g. a file system without locks
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield lambda: _fsync_quietly(fd)
    finally:
        os.close(fd)


def _fsync_quietly(fd: int) -> None:
    with suppress(OSError):  # some file systems refuse to fsync a directory; the renames still happened
        os.fsync(fd)


def write_atomic(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` to a temporary file in ``directory``, fsync it, then rename it over ``name``."""
    temp = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}-{name}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with open(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, directory / name)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
