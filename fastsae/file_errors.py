"""The errors of fastsae's file readers and writers, and the translation of a failed write into one.

`CorruptFileError` (a ValueError): a file the library reads is damaged or is not what it should be; the
message names the path, the line where there is one, and what was wrong. `WriteFailedError` (an OSError
with the system's errno): a write failed (a full disk, a quota, an I/O error; safetensors' own
`SafetensorError: ... I/O error` too), its message "<what went wrong> writing <path>".
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

import safetensors


class CorruptFileError(ValueError):
    """A file the library reads is damaged or is not what it should be. `path`, `line` (or None) and
    `reason` say where and what; the message is "<path>[:<line>]: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str, line: int | None = None):
        self.path, self.reason, self.line = Path(path), reason, line
        super().__init__(f"{path}{'' if line is None else f':{line}'}: {reason}")



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
