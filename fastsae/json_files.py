"""Reading JSON with suspicion: a size and a nesting limit, the type of the value and of its fields
checked, and a file that is something else (a pickle, a zip from `torch.save`, an .npy) named as such.
Every failure is a `CorruptFileError` naming the path (and line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .file_errors import CorruptFileError


def sniff_format(head: bytes) -> str | None:
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


def json_type_name(kind: type) -> str:
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
    why = sniff_format(data[:8])
    if why:
        raise CorruptFileError(path, f"not JSON: {why}")
    obj = parse_json(data, path)
    if not isinstance(obj, expect):
        raise CorruptFileError(path, f"expected a JSON {json_type_name(expect)}, "
                                     f"got a JSON {json_type_name(type(obj))}")
    return obj


def check_fields(obj: dict, path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """CorruptFileError unless obj has every key of fields with a value of its type (bool is not an int)."""
    for key, kind in fields.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if key not in obj:
            raise CorruptFileError(path, f"field {key!r} is missing")
        value = obj[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(json_type_name(k) for k in kinds)
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
            raise CorruptFileError(path, f"expected a JSON object, got a JSON {json_type_name(type(obj))}", line=number)
        yield number, obj
