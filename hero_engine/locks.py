"""Per-folder locks: one holder at a time across threads *and* processes (docs/session_store.md).

``FolderLock(folder, name)`` is an exclusive, re-entrant lock on ``<folder>/<name>``:

* across processes: ``fcntl.flock(LOCK_EX)`` on the lock file (``msvcrt.locking`` on Windows).
  The kernel drops the lock when its holder dies, so a SIGKILL never leaves a session locked;
* within a process: a ``threading.RLock`` shared by every ``FolderLock`` on the same file
  (flock locks belong to an open file description, so two threads of one process must not each
  open the file: the first acquisition in a process opens it, nested ones only count).

A folder whose lock file cannot be created (read-only disk) is locked within the process only:
nothing can be written there anyway, so readers need no protection from other processes.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

__all__ = ["FolderLock", "try_lock_file", "unlock_file"]

log = logging.getLogger("HERO")


class _Shared:
    """The per-process state of one lock file."""

    def __init__(self):
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: Optional[int] = None
        self.owner: Optional[int] = None


_REGISTRY: dict[str, _Shared] = {}
_REGISTRY_LOCK = threading.Lock()


def _shared(path: Path) -> _Shared:
    key = os.path.normcase(os.path.realpath(path))  # one entry per file, however it is named
    with _REGISTRY_LOCK:
        s = _REGISTRY.get(key)
        if s is None:
            s = _REGISTRY[key] = _Shared()
        return s


def try_lock_file(fd: int, blocking: bool) -> bool:
    """Exclusive OS lock on an open file; False if ``blocking`` is False and it is held."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) and not blocking:
                return False
            raise
    while True:  # msvcrt: lock byte 0
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not blocking:
                return False
            time.sleep(0.02)


def unlock_file(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class FolderLock:
    """``with FolderLock(session_dir):`` -- see the module docstring."""

    def __init__(self, folder: str | os.PathLike, name: str = ".lock"):
        self.path = Path(folder) / name
        self._s = _shared(self.path)

    def acquire(self, blocking: bool = True, reentrant: bool = True) -> bool:
        """Take the lock. ``reentrant=False`` refuses (returns False) when this thread already
        holds it, for callers that must know nobody -- themselves included -- is inside."""
        s = self._s
        if not s.rlock.acquire(blocking):
            return False
        if s.depth > 0:
            if not reentrant:
                s.rlock.release()
                return False
            s.depth += 1
            return True
        try:
            fd = self._open()
            if fd is not None and not try_lock_file(fd, blocking):
                os.close(fd)
                s.rlock.release()
                return False
        except BaseException:
            s.rlock.release()
            raise
        s.fd, s.depth, s.owner = fd, 1, threading.get_ident()
        return True

    def _open(self) -> Optional[int]:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise
        except OSError as e:  # read-only or full disk: lock within this process only
            try:
                return os.open(self.path, os.O_RDONLY)
            except OSError:
                log.debug("HERO: cannot open lock file %s (%s); locking in-process only",
                          self.path, e)
                return None

    def release(self) -> None:
        s = self._s
        s.depth -= 1
        if s.depth == 0:
            fd, s.fd, s.owner = s.fd, None, None
            if fd is not None:
                try:
                    unlock_file(fd)
                finally:
                    os.close(fd)
        s.rlock.release()

    def held(self) -> bool:
        """Whether the calling thread holds this lock."""
        return self._s.depth > 0 and self._s.owner == threading.get_ident()

    def __reduce__(self):  # copies and pickles of a Session share the per-process lock state
        return (FolderLock, (self.path.parent, self.path.name))

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
