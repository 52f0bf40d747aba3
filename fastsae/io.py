"""Files written whole and read with suspicion.

Writing: `atomic_write` (a file) and `replace_directory` (a directory, e.g. a saved SAE) build the new
version under a temporary name beside the target, fsync it, then rename it into place, so an interrupted
run leaves either the old version or the new one, never a mix. A write that fails (a full disk, a quota, an
I/O error; safetensors' own `SafetensorError: ... I/O error` too) raises `WriteFailedError`, an `OSError`
with the system's errno whose message names the file: "no space left on device writing <path>"; the old
version stays and the temporary is removed. Temporaries are named
`.<name>.<pid>-<process tag><token>.tmp` (the tag tells a killed writer from a new process that got its pid)
and created with mode 0666 & ~umask, like any other file.

Reading: every reader raises `CorruptFileError` (a ValueError) naming the path, and the line where there
is one, and what was wrong: truncated, binary, pickle or `torch.save` data, a wrong JSON type, a checksum
that does not match. No pickle is ever loaded. JSON is read with a size and a nesting limit, and the
headers of safetensors and `.npy` files are checked against the file's size before anything is mapped.

Writers of a directory (a harvest into a store, training into a run directory) hold `DirectoryLock`, an
exclusive `flock` on `<dir>/.lock`: a second writer gets an error naming the holder (pid, host), and a
killed writer's lock disappears with it. Within a process it is re-entrant for the thread that holds it
(the pipeline holds a run directory's lock around `Trainer.fit`, which takes it again) and refused to any
other thread. Under the lock, `remove_stale_temporaries` deletes what dead
writers left half-written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    """Another live process, or another thread of this one, holds the directory's writer lock."""


class WriteFailedError(OSError):
    """Writing path failed: a full disk, a quota, an I/O error. `errno` is the system's (ENOSPC for a full
    disk); the message is "<what went wrong> writing <path>", e.g. "no space left on device writing
    run/sae/sae.safetensors". The writers that raise it leave path as it was and nothing half-written."""

    def __init__(self, code: int, path: str | os.PathLike | None, reason: str | None = None):
        reason = reason or _reason(code)
        super().__init__(code, reason)
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.strerror} {'while writing' if self.filename is None else f'writing {self.filename}'}"

    def __reduce__(self):  # OSError pickles its args, which are not this constructor's
        return type(self), (self.errno, self.filename, self.strerror)


def _reason(code: int) -> str:
    """os.strerror as a phrase: 'No space left on device' -> 'no space left on device'."""
    text = os.strerror(code) if code else "I/O error"
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


# safetensors reports the system error inside its message: "... I/O error: No space left on device (os error 28)"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_failure(err: BaseException, path: str | os.PathLike | None) -> WriteFailedError | None:
    """err, raised while writing path, as a WriteFailedError naming path; None when err is not an I/O
    failure (a bug, a wrong argument: raised as it is). An OSError keeps its errno; a SafetensorError that
    wraps one gets the errno its message gives."""
    if isinstance(err, WriteFailedError):
        return err
    if isinstance(err, OSError):
        return WriteFailedError(err.errno or errno.EIO, path)
    if isinstance(err, safetensors.SafetensorError):
        text = str(err)
        found = _OS_ERROR.search(text)
        if found:
            return WriteFailedError(int(found.group(1)), path)
        if "No space left on device" in text:
            return WriteFailedError(errno.ENOSPC, path)
        if "I/O error" in text:
            return WriteFailedError(errno.EIO, path)
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Errors of the block that are I/O failures (see write_failure) raised as WriteFailedError naming path;
    one that already names a file is left as it is."""
    try:
        yield
    except WriteFailedError:
        raise
    except (OSError, safetensors.SafetensorError) as err:
        failed = write_failure(err, path)
        if failed is None:
            raise
        raise failed from err


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


# JSON limits. fastsae writes no JSON nested deeper than a few levels; Python's json, and any code that walks
# or compares the value, recurses once per level and fails with a bare RecursionError near 1000.
MAX_JSON_DEPTH = 100
# The largest JSON file it reads (the feature cache's vocabulary of a 262k-token model is ~5 MB): a bigger
# one is not fastsae's, and is refused before it is read into memory.
MAX_JSON_BYTES = 256 << 20
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


def json_too_deep(raw: bytes) -> int:
    """How deeply the JSON text raw nests arrays and objects (brackets inside strings do not count) when
    that is more than MAX_JSON_DEPTH, else 0. In C and numpy, a fraction of what parsing it costs."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:  # too few brackets to nest deeper: no scan
        return 0
    # Escapes go first (\\ before \", as a JSON reader pairs them), so every quote left opens or closes a
    # string; then only quotes and brackets are kept.
    marks = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    kind = np.frombuffer(marks, dtype=np.uint8)
    quote = kind == ord('"')
    outside = (np.cumsum(quote) - quote) % 2 == 0  # an even number of quotes before it
    opening = outside & ((kind == ord("[")) | (kind == ord("{")))
    closing = outside & ((kind == ord("]")) | (kind == ord("}")))
    depth = int(np.cumsum(opening.astype(np.int64) - closing).max(initial=0))
    return depth if depth > MAX_JSON_DEPTH else 0


def parse_json(raw: bytes, path: str | os.PathLike, line: int | None = None):
    """The JSON value in raw (the bytes of path, or of its line), nested at most MAX_JSON_DEPTH deep;
    CorruptFileError naming path (and line) otherwise."""
    depth = json_too_deep(raw)
    if depth:
        raise CorruptFileError(path, f"JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} fastsae "
                                     f"reads (not a file it wrote)", line=line)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorruptFileError(path, f"not JSON: binary data at byte {err.start}", line=line) from None
    except json.JSONDecodeError as err:
        raise CorruptFileError(path, f"invalid JSON ({err.msg} at column {err.colno}; truncated?)",
                               line=err.lineno if line is None else line) from None
    except RecursionError:  # the depth check passed, but the caller's stack was already deep
        raise CorruptFileError(path, "JSON nested too deeply to read", line=line) from None


def read_json(path: str | os.PathLike, expect: type = dict, max_bytes: int = MAX_JSON_BYTES):
    """The JSON value in path, which must be of type expect (dict: a JSON object), hold at most max_bytes
    and nest at most MAX_JSON_DEPTH deep."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a JSON config at {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise CorruptFileError(path, f"{size} bytes, more than the {max_bytes} of any JSON file fastsae reads "
                                     f"(not a file it wrote)")
    data = path.read_bytes()
    why = _sniff(data[:8])
    if why:
        raise CorruptFileError(path, f"not JSON: {why}")
    obj = parse_json(data, path)
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
        if json_too_deep(raw):
            raise CorruptFileError(path, f"not a JSON line (nested more than {MAX_JSON_DEPTH} levels deep)",
                                   line=number)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            if tolerate_partial_last_line and number - 1 == last_unterminated:
                return
            raise CorruptFileError(path, f"not a JSON line ({err})", line=number) from None
        if not isinstance(obj, dict):
            raise CorruptFileError(path, f"expected a JSON object, got a JSON {_json_name(type(obj))}", line=number)
        yield number, obj


# safetensors' own limit on a header (its HeaderTooLarge), checked here with the file named.
MAX_SAFETENSORS_HEADER = 100_000_000


def check_safetensors(path: str | os.PathLike, error: type[CorruptFileError] = CorruptFileError) -> None:
    """error naming path unless its header fits in the file and says where every tensor's data lies within
    it: a header that claims 10 GB, or tensors past the end of a truncated file, are refused before
    safetensors maps anything. Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        claimed = int.from_bytes(head, "little") if len(head) == 8 else None
        why = None
        if claimed is None:
            why = f"not a valid safetensors file: {size} bytes, not even the 8 of its header's length (truncated?)"
        elif claimed > min(size - 8, MAX_SAFETENSORS_HEADER):
            why = (f"not a valid safetensors file: its header claims {claimed} bytes, the file holds {size} "
                   f"(truncated or overwritten?)")
        if why:  # sniffed only now: a valid header length may begin with a pickle's bytes (0x80 0x02 = 640)
            sniffed = _sniff(head)
            raise error(path, f"not a safetensors file: {sniffed}" if sniffed else why)
        try:
            header = parse_json(f.read(claimed), path)
        except CorruptFileError as err:
            raise error(path, f"not a valid safetensors file (its header: {err.reason})") from None
    if not isinstance(header, dict):
        raise error(path, f"not a valid safetensors file (its header is a JSON {_json_name(type(header))})")
    data = size - 8 - claimed
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise error(path, f"not a valid safetensors file (tensor {name!r} has no [begin, end] data_offsets)")
        if offsets[1] > data:
            raise error(path, f"truncated: tensor {name!r} claims bytes {offsets[0]}..{offsets[1]} of the data, "
                              f"the file holds {data}")


@contextlib.contextmanager
def open_tensors(path: str | os.PathLike, device: str = "cpu",
                 error: type[CorruptFileError] = CorruptFileError) -> Iterator:
    """safetensors.safe_open(path) after check_safetensors; safetensors' errors, also those of reading a
    tensor inside the block, raised as error naming path."""
    check_safetensors(path, error)
    try:
        with safetensors.safe_open(str(path), framework="pt", device=device) as f:
            yield f
    except safetensors.SafetensorError as err:
        raise error(path, f"not a valid safetensors file ({err}; truncated or overwritten?)") from None


def read_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """safetensors only: never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a safetensors file at {path}")
    check_safetensors(path)
    try:
        return safetensors.torch.load_file(str(path), device=device)
    except safetensors.SafetensorError as err:
        raise CorruptFileError(path, f"not a valid safetensors file ({err}; truncated or overwritten?)") from None


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """The array in an .npy file, memory-mapped, after its header is checked against the file: a file that
    is not .npy, holds Python objects (pickles, never loaded) or is shorter than its header says
    (truncated) is a CorruptFileError naming path and saying which."""
    path = Path(path)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise CorruptFileError(path, "not an .npy array (no NUMPY header)") from None
        if version not in readers:
            raise CorruptFileError(path, f"an .npy file of format version {version}, which fastsae does not read")
        try:
            shape, _, dtype = readers[version](f)
        except ValueError as err:
            raise CorruptFileError(path, f"not a valid .npy header ({err})") from None
        start = f.tell()
    if dtype.hasobject:
        raise CorruptFileError(path, f"holds pickled Python objects, which fastsae never loads (dtype {dtype})")
    need, held = math.prod(shape) * dtype.itemsize, path.stat().st_size - start
    if need > held:
        raise CorruptFileError(path, f"truncated: its header says {dtype} {tuple(shape)}, {need} bytes of data; "
                                     f"the file holds {held}")
    return np.load(path, mmap_mode="r", allow_pickle=False)


# ---- the writer lock -----------------------------------------------------------------------------------

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
