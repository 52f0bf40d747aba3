"""Files written whole and read with suspicion.

Writing: `atomic_write` (a file) and `replace_directory` (a directory, e.g. a saved SAE) build the new
version under a temporary name beside the target, fsync it, then rename it into place, so an interrupted
run leaves either the old version or the new one, never a mix. Temporaries are named
`.<name>.<pid>-<process tag><token>.tmp` (the tag tells a killed writer from a new process that got its pid)
and created with mode 0666 & ~umask, like any other file.

Reading: every reader raises `CorruptFileError` (a ValueError) naming the path, and the line where there
is one, and what was wrong: truncated, binary, pickle or `torch.save` data, a wrong JSON type, a checksum
that does not match. No pickle is ever loaded.

Writers of a directory (a harvest into a store, training into a run directory) hold `DirectoryLock`, an
exclusive `flock` on `<dir>/.lock`: a second writer gets an error naming the holder (pid, host), and a
killed writer's lock disappears with it. Under the lock, `remove_stale_temporaries` deletes what dead
writers left half-written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors
import safetensors.torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # not on Windows: directories are not locked there
    fcntl = None


class CorruptFileError(ValueError):
    """A file the library reads is damaged or is not what it should be. `path`, `line` (or None) and
    `reason` say where and what; the message is "<path>[:<line>]: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str, line: int | None = None):
        self.path, self.reason, self.line = Path(path), reason, line
        super().__init__(f"{path}{'' if line is None else f':{line}'}: {reason}")


class DirectoryLockedError(RuntimeError):
    """Another live process holds the directory's writer lock."""


# ---- temporaries ---------------------------------------------------------------------------------------

_TEMP = re.compile(r"^\..+\.(\d+)-([0-9a-f]+)\.tmp$")
# Names written by older versions (tempfile.mkstemp, checkpoint .tmp-<step>-<pid>): stale whenever found.
_LEGACY_TEMP = re.compile(r"^(\..+\.[A-Za-z0-9_]{8}\.tmp|\.tmp-\d{8}-\d+)$")


# A pid alone does not name a process: in a fresh container the resumed run often gets the pid of the run that
# was killed, and took its half-written shard for one of its own. The tag, new in every process, tells them apart.
_PROCESS_TAG = secrets.token_hex(4)


def _new_process_tag() -> None:
    global _PROCESS_TAG
    _PROCESS_TAG = secrets.token_hex(4)


os.register_at_fork(after_in_child=_new_process_tag)


def temp_name(name: str) -> str:
    """A temporary name for name, tagged with this process: `.<name>.<pid>-<process tag><token>.tmp`."""
    return f".{name}.{os.getpid()}-{_PROCESS_TAG}{secrets.token_hex(4)}.tmp"


def _is_ours(match: re.Match) -> bool:
    return int(match.group(1)) == os.getpid() and match.group(2).startswith(_PROCESS_TAG)


def is_temporary(name: str) -> bool:
    return bool(_TEMP.match(name) or _LEGACY_TEMP.match(name))


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries in directory (not recursive) that another process left. Call it only while
    holding the directory's `DirectoryLock`: every other writer is then dead. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        match = _TEMP.match(entry.name)
        if match and _is_ours(match):
            continue  # one of ours, possibly being written right now
        if match or _LEGACY_TEMP.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_dead_siblings(path: Path) -> None:
    """The temporaries that dead processes left while replacing path (no lock needed: the pid says)."""
    own = re.compile(re.escape(f".{path.name}.") + r"(\d+)-([0-9a-f]+)\.tmp$")
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = own.match(entry.name)
        if not match or _is_ours(match):
            continue
        if int(match.group(1)) != os.getpid() and _alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _create_temp(directory: Path, name: str) -> Path:
    for _ in range(100):
        tmp = directory / temp_name(name)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask, as open() does
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {directory / name}")


# ---- writing -------------------------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under root, root last."""
    root = Path(root)
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            fsync_dir(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary name beside path, fsync it, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
    mode = tmp.stat().st_mode & 0o777  # 0666 & ~umask; a writer that replaces the file (safetensors) loses it
    try:
        write(str(tmp))
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_directory(path: str | os.PathLike, write: Callable[[Path], None],
                      allowed: tuple[str, ...] | None = None) -> Path:
    """write(tmp_dir) fills a fresh directory beside path; it is fsynced and then takes path's place in one
    step (an atomic exchange on Linux, else two renames), and the old directory is deleted. A kill at any
    moment leaves path holding the old contents or the new, never a mix.

    allowed: the only names an existing path may hold; anything else would be deleted with it, so it is
    refused instead (nothing lost)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if allowed is not None:
            foreign = sorted(p.name for p in path.iterdir() if p.name not in allowed and not is_temporary(p.name))
            if foreign:
                raise FileExistsError(f"{path} holds files that are not part of what is being saved ({foreign}): "
                                      f"replacing it would delete them; save into another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(path)
    tmp = path.parent / temp_name(path.name)
    os.mkdir(tmp, 0o777)  # & ~umask
    held = os.open(tmp, os.O_RDONLY)  # keeps its inode from being reused, so a re-created tmp is told apart
    try:
        write(tmp)
        made, now = os.fstat(held), os.stat(tmp)
        if made.st_nlink == 0 or (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
            raise RuntimeError(f"{tmp} was deleted and re-created while {path} was being written: not published")
        fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif not _exchange(tmp, path):
            aside = path.parent / temp_name(path.name)
            os.rename(path, aside)
            os.rename(tmp, path)
            tmp = aside
        fsync_dir(path.parent)
    finally:
        os.close(held)
        shutil.rmtree(tmp, ignore_errors=True)  # the new copy on failure, the old one on success
    return path


def write_json(path: str | os.PathLike, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def write_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


# ---- reading -------------------------------------------------------------------------------------------


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, recorded_in: str | os.PathLike) -> None:
    """CorruptFileError unless path's SHA-256 is expected (as recorded in recorded_in)."""
    if sha256(path) != expected:
        raise CorruptFileError(path, f"SHA-256 does not match the one recorded in {recorded_in} "
                                     f"(damaged, or not the file that was saved with it)")


def _sniff(head: bytes) -> str | None:
    """What a file that should be JSON or safetensors is instead, judged by its first bytes."""
    if not head:
        return "the file is empty (truncated?)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "it holds pickle data, which fastsae never loads"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive, as torch.save writes (pickles inside; fastsae never loads them)"
    if head[:6] == b"\x93NUMPY":
        return "it is a numpy .npy file"
    return None


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number",
            bool: "boolean", type(None): "null"}.get(kind, kind.__name__)


def read_json(path: str | os.PathLike, expect: type = dict):
    """The JSON value in path, which must be of type expect (dict: a JSON object)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a JSON config at {path}")
    data = path.read_bytes()
    why = _sniff(data[:8])
    if why:
        raise CorruptFileError(path, f"not JSON: {why}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorruptFileError(path, f"not JSON: binary data at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise CorruptFileError(path, f"invalid JSON ({err.msg} at column {err.colno}; truncated?)",
                               line=err.lineno) from None
    if not isinstance(obj, expect):
        raise CorruptFileError(path, f"expected a JSON {_json_name(expect)}, got a JSON {_json_name(type(obj))}")
    return obj


def check_fields(obj: dict, path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """CorruptFileError unless obj has every key of fields with a value of its type (bool is not an int)."""
    for key, kind in fields.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if key not in obj:
            raise CorruptFileError(path, f"field {key!r} is missing")
        value = obj[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_json_name(k) for k in kinds)
            raise CorruptFileError(path, f"field {key!r} must be {'an' if names[0] in 'aeiou' else 'a'} {names}, "
                                         f"got {value!r}")
    return obj


def read_jsonl(path: str | os.PathLike, tolerate_partial_last_line: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for every non-blank line of path. A malformed line raises CorruptFileError
    naming its line; with tolerate_partial_last_line, a last line without its newline that does not parse
    (a writer killed mid-line) is skipped instead."""
    path = Path(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # the split leaves "" after a final newline; a non-empty last piece had no newline
    last_unterminated = len(lines) - 1 if lines[-1] else None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if tolerate_partial_last_line and number - 1 == last_unterminated:
                return
            raise CorruptFileError(path, f"not a JSON line ({err})", line=number) from None
        if not isinstance(obj, dict):
            raise CorruptFileError(path, f"expected a JSON object, got a JSON {_json_name(type(obj))}", line=number)
        yield number, obj


def read_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """safetensors only: never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a safetensors file at {path}")
    try:
        return safetensors.torch.load_file(str(path), device=device)
    except safetensors.SafetensorError as err:
        # sniffed only now: a valid header length may begin with a pickle's bytes (0x80 0x02 = 640)
        with open(path, "rb") as f:
            why = _sniff(f.read(8))
        raise CorruptFileError(path, f"not a safetensors file: {why}" if why else
                               f"not a valid safetensors file ({err}; truncated or overwritten?)") from None


# ---- the writer lock -----------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # realpath -> [fd, count]: re-entrant within a process
_held_guard = threading.Lock()


class DirectoryLock:
    """An exclusive writer lock on a directory, for as long as this process holds it (re-entrant).

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
            if key in _held:
                _held[key][1] += 1
            elif fcntl is not None:
                fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    raise DirectoryLockedError(
                        f"{self.directory} is being written by another process ({_describe(holder)}); "
                        f"{self.purpose} needs it alone: wait for that one to finish or stop it") from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                                          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n", 0)
                _held[key] = [fd, 1]
            else:
                _held[key] = [None, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _held_guard:
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                if entry[0] is not None:
                    os.close(entry[0])  # closing the descriptor drops the flock
        self._key = None


def _describe(holder: str) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        info = json.loads(holder)
        return f"pid {info['pid']} on host {info['host']}, {info['purpose']} since {info['since']}"
    return "holder unknown"
