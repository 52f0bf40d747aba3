"""One writer per directory: `DirectoryLock`, an exclusive `flock` on `<dir>/.lock`.

Writers of a directory (a harvest into a store, training into a run directory) hold it: a second writer
gets `DirectoryLockedError` naming the holder (pid, host), and a killed writer's lock disappears with it.
Within a process it is re-entrant for the thread that holds it (the pipeline holds a run directory's lock
around `Trainer.fit`, which takes it again) and refused to any other thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: directories are not locked there
    fcntl = None


class DirectoryLockedError(RuntimeError):
    """Another live process, or another thread of this one, holds the directory's writer lock."""


LOCK_FILE = ".lock"


@dataclass
class _Holding:
    """This process's hold on one directory's lock: re-entrant for `thread`, refused to every other."""

    fd: int | None
    thread: threading.Thread
    purpose: str
    since: str
    count: int = 1


_held: dict[str, _Holding] = {}  # realpath -> this process's hold
_held_guard = threading.Lock()


class DirectoryLock:
    """An exclusive writer lock on a directory, for as long as this process holds it: one writer per
    directory between processes and between the threads of one process; re-entrant for the thread that
    holds it (the pipeline holds a run directory's lock around `Trainer.fit`, which takes it again).

        with DirectoryLock(run_dir, "training"):
            ...

    It is `fcntl.flock` on `<dir>/.lock`, which also records the holder (pid, host, purpose, time) for
    the error a second writer gets. The kernel drops the lock when its process dies, so a SIGKILLed
    writer never blocks a resume. Advisory: readers do not take it."""

    def __init__(self, directory: str | os.PathLike, purpose: str):
        self.directory, self.purpose = Path(directory), purpose
        self._key: str | None = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> DirectoryLock:
        if self._key is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.directory)
        with _held_guard:
            holding = _held.get(key)
            if holding is None:
                _held[key] = _Holding(self._flock(), threading.current_thread(), self.purpose,
                                      time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            elif holding.thread is threading.current_thread():
                holding.count += 1
            else:  # flock would let this process in again: the threads are told apart here
                raise DirectoryLockedError(
                    f"{self.directory} is being written by another thread of this process (thread "
                    f"{holding.thread.name!r}, {holding.purpose} since {holding.since}); {self.purpose} needs it "
                    f"alone: wait for that one to finish")
        self._key = key
        return self

    def _flock(self) -> int | None:
        """The descriptor of <dir>/.lock, flocked, with this process written in it; None without fcntl."""
        if fcntl is None:
            return None
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise DirectoryLockedError(
                f"{self.directory} is being written by another process ({_describe(holder)}); "
                f"{self.purpose} needs it alone: wait for that one to finish or stop it") from None
        with contextlib.suppress(OSError):  # the holder's name only serves the error above: a full disk
            os.ftruncate(fd, 0)  # must not stop the writer, whose own writes will say it, naming their file
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n", 0)
        return fd

    def release(self) -> None:
        if self._key is None:
            return
        with _held_guard:
            holding = _held[self._key]
            holding.count -= 1
            if holding.count == 0:
                del _held[self._key]
                if holding.fd is not None:
                    os.close(holding.fd)  # closing the descriptor drops the flock
        self._key = None


def _describe(holder: str) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        info = json.loads(holder)
        return f"pid {info['pid']} on host {info['host']}, {info['purpose']} since {info['since']}"
    return "holder unknown"
