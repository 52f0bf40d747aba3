"""Files written whole, and the one import point for fastsae's file handling.

Writing: `atomic_write` (a file) and `replace_directory` (a directory, e.g. a saved SAE) build the new
version under a temporary name beside the target, fsync it, then rename it into place, so an interrupted
run leaves either the old version or the new one, never a mix. A write that fails (a full disk, a quota, an
I/O error) raises `WriteFailedError` naming the file ("no space left on device writing <path>"); the old
version stays and the temporary is removed. Temporaries are named
`.<name>.<pid>-<process tag><token>.tmp` (the tag tells a killed writer from a new process that got its pid)
and created with mode 0666 & ~umask, like any other file; under a directory's `DirectoryLock`,
`remove_stale_temporaries` deletes what dead writers left half-written. `AppendLog` grows a file by whole
lines.

Reading (`json_files`, `tensor_files`): every reader raises `CorruptFileError` (a ValueError) naming the
path, the line where there is one, and what was wrong. No pickle is ever loaded.

The writer lock is `file_lock.DirectoryLock`; the errors are in `file_errors`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors.torch
from torch import Tensor

# The readers, the lock and the errors live in modules of their own; they are named here too, so that the
# library's forty-odd callers keep one import point for files (`from fastsae import io`; io.read_json, ...).
from .file_errors import CorruptFileError, WriteFailedError, write_failure, writing
from .file_lock import LOCK_FILE, DirectoryLock, DirectoryLockedError
from .json_files import MAX_JSON_BYTES, MAX_JSON_DEPTH, check_fields, json_too_deep, parse_json, read_json, read_jsonl
from .tensor_files import check_safetensors, open_tensors, read_npy, read_tensors, sha256, verify_sha256

__all__ = [
    "LOCK_FILE", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "AppendLog", "CorruptFileError", "DirectoryLock",
    "DirectoryLockedError", "WriteFailedError", "atomic_write", "check_fields", "check_safetensors", "fsync_dir",
    "fsync_tree", "is_temporary", "json_too_deep", "open_tensors", "parse_json", "read_json", "read_jsonl",
    "read_npy", "read_tensors", "remove_stale_temporaries", "replace_directory", "sha256", "temp_name",
    "verify_sha256", "write_failure", "write_figure", "write_json", "write_tensors", "writing",
]


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
    """Call write(tmp_path) on a temporary name beside path, fsync it, then rename it over path. A failure
    (a full disk: WriteFailedError naming path) leaves path as it was and removes the temporary."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path.parent, path.name)
        try:
            mode = tmp.stat().st_mode & 0o777  # 0666 & ~umask; a writer that replaces the file (safetensors) loses it
            write(str(tmp))
            if tmp.stat().st_mode & 0o777 != mode:
                os.chmod(tmp, mode)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # a full disk may only show here, when delayed allocation meets the disk
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
    tmp = path.parent / temp_name(path.name)
    with _writing_into(tmp, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_siblings(path)
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


@contextlib.contextmanager
def _writing_into(tmp: Path, path: Path) -> Iterator[None]:
    """writing(path) for a directory built in tmp: a failure to write a file inside tmp names the place
    that file was going to, path/<its name>, not the temporary the user never sees."""
    try:
        with writing(path):
            yield
    except WriteFailedError as err:
        if err.filename is None or not Path(err.filename).is_relative_to(tmp):
            raise
        raise WriteFailedError(err.errno, path / Path(err.filename).relative_to(tmp), err.strerror) \
            from err.__cause__ or err


def write_json(path: str | os.PathLike, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def write_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def write_figure(path: str | os.PathLike, fig, dpi: int = 120) -> Path:
    """A matplotlib figure saved whole (atomic_write), in the format path's suffix names (.png, .svg)."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".")))
    return path


class AppendLog:
    """A file that grows by whole lines (metrics.jsonl). A line that cannot be written whole (a full disk)
    is cut off again, so the file never ends in half a line, and the error is a WriteFailedError naming
    the file. One writer at a time (the run directory's lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with writing(self.path):
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        with writing(self.path):
            size = os.fstat(self._fd).st_size
            try:
                while data:  # a write to a filling disk may take part of the line, then fail
                    data = data[os.write(self._fd, data):]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
