"""A bank directory's files on disk: read only when they are regular files (a FIFO or a device would hang the
loader), the weights file no longer than its header declares and read with its sha256 checked (memory-mapped
for format 3, see ``lafn_hf.bank.format``); files written crash-safely (a temporary file, fsynced, renamed) under a lock on
the directory."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors

TEMP_PREFIX = ".lafn-tmp-"  # our temporary files inside a bank directory


# -- reading ---------------------------------------------------------------------------------------------
def read_weights(path: Path, sha256: str | None, config_name: str, mapped: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` once its sha256 (when recorded) is checked; memory-mapped when ``mapped`` (not on
    Windows). ``FileNotFoundError`` when the file is gone or was replaced meanwhile (a concurrent save);
    ``ValueError`` when it is not a regular file or not exactly as long as its header declares (checked before
    any hashing, so a device or a sparse terabyte is refused at once)."""
    with open_regular(path) as handle:
        _check_declared_size(handle, path)
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


def read_regular(path: Path) -> bytes:
    """The bytes of ``path``, a regular file (else ``ValueError``; ``FileNotFoundError`` when it is missing)."""
    with open_regular(path) as handle:
        return handle.read()


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


@contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """``path`` open for reading, checked to be a regular file: opened without blocking (a FIFO would block the
    open), then ``fstat``-ed (a device or a FIFO never ends). Other failures to open are a ``ValueError`` too,
    except ``FileNotFoundError``."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as error:  # a socket (ENXIO), permissions, ...
        raise ValueError(f"{path} cannot be read: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')}); "
                             "a bank's files must be regular files")
        handle = open(fd, "rb")  # noqa: SIM115 (closed below)
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


_HEADER_LIMIT = 100_000_000  # safetensors refuses longer headers


def _check_declared_size(handle: BinaryIO, path: Path) -> None:
    """``ValueError`` unless the safetensors file is exactly as long as its header declares (8-byte header
    length, JSON header, then the data up to the largest ``data_offsets`` end); leaves ``handle`` at 0."""
    size = os.fstat(handle.fileno()).st_size
    head = handle.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < length <= min(_HEADER_LIMIT, size - 8):
        raise ValueError(f"{path} is corrupted or truncated: its header length {length} does not fit its {size} bytes")
    try:
        header = json.loads(handle.read(length))
        data = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if type(data) is not int:
            raise TypeError(data)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise ValueError(f"{path} is corrupted or truncated: its header is not a safetensors header") from None
    declared = 8 + length + data
    if size != declared:
        raise ValueError(f"{path} is corrupted or truncated: it has {size} bytes, its header declares {declared}")
    handle.seek(0)


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


def write_temp(directory: Path, name: str, data: bytes) -> Path:
    """``data`` in a new temporary file of ``directory`` named after ``name``, written and fsynced (removed again
    when that fails, e.g. a full disk)."""
    temp = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}-{name}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
    return temp


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:_WRITE_CHUNK]) :]


_WRITE_CHUNK = 1 << 24  # one write may be short, and some systems refuse 2 GiB at once


def write_atomic(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` to a temporary file in ``directory``, fsync it, then rename it over ``name``."""
    temp = write_temp(directory, name, data)
    try:
        os.replace(temp, directory / name)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
