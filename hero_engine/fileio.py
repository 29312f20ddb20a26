"""Atomic file writes: every file of a session and every exported LoRA goes through here.

write = temp file in the same folder + fsync + ``os.replace`` + fsync of the folder, so a reader
(or a crash) sees either the old file or the new one, never half of one.

A temp file (``.<name>.<random>.tmp``) is locked (``locks.try_lock_file``) by its writer while it is
written, so :func:`remove_stale_temps` can tell a leftover of a killed writer (nobody holds its lock)
from one being written right now, in this process or another.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .locks import try_lock_file, unlock_file

__all__ = ["fsync_dir", "atomic_write_bytes", "atomic_write_json", "atomic_torch_save",
           "remove_stale_temps", "TEMP_SUFFIX", "PUBLIC_MODE", "current_umask"]

TEMP_SUFFIX = ".tmp"
_CAN_LOCK = os.name == "posix"   # Windows: no flock; an open file cannot be deleted there anyway
_UNLOCKED_STALE_S = 3600
_write = os.write  # tests replace it to simulate a full disk
PUBLIC_MODE = 0o666  # files meant for other programs and users (exports): 0644 under umask 022


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux
    ``/proc/self/status``); elsewhere set-and-restore (a tiny window, exports only)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """On failure the temp file is removed and ``path`` is untouched.

    ``mode``: None keeps the temp file's private 0600 (session files); e.g. :data:`PUBLIC_MODE`
    gives the file the permissions a plain ``open(path, "w")`` would (``mode & ~umask``), for
    files other users and programs must read (exported LoRAs, datasets, latents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _locked_temp(path)
    try:
        try:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(fd, mode & ~current_umask() & 0o7777)
            view = memoryview(data)
            while view:
                view = view[_write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, path)  # still open and locked: no cleaner can take it before this
        finally:
            os.close(fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _locked_temp(path: Path) -> tuple[int, str]:
    """A new temp file next to ``path``, locked by us. A cleaner that unlinked it in the instant
    between its creation and our lock (it looked abandoned) makes us start over with a new one."""
    for _ in range(100):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        if not _CAN_LOCK:
            return fd, tmp
        try:
            try_lock_file(fd, blocking=True)
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(f"could not create a temp file next to {path}")


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temp files of atomic writes that were killed (``.*.tmp`` that no live writer
    holds locked) under ``folder``; returns what was deleted. Temp files being written now, by
    any thread or process, are left alone."""
    folder = Path(folder)
    now = time.time()
    found = folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}")
    removed = []
    for p in found:
        try:
            if not p.is_file() or p.is_symlink():
                continue
            if not _CAN_LOCK:  # no advisory locks: only what is clearly abandoned
                if now - p.stat().st_mtime > _UNLOCKED_STALE_S:
                    p.unlink()
                    removed.append(p)
                continue
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not try_lock_file(fd, blocking=False):
                continue  # a writer is at work
            if os.path.samestat(os.fstat(fd), os.stat(p)):
                os.unlink(p)  # unlinked while we hold its lock: a writer that locks it after us
                removed.append(p)  # sees the name gone and starts over (_locked_temp)
        except OSError:
            pass
        finally:
            try:
                unlock_file(fd)
            except OSError:
                pass
            os.close(fd)
    return removed


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int | None = None) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), mode=mode)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
