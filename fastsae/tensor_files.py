"""Reading tensor files with their headers checked against the file before anything is mapped
(safetensors, .npy; never a pickle), and the SHA-256 checksums recorded beside saved files. Every failure
is a `CorruptFileError` naming the path and what was wrong: truncated, overwritten, pickled, a checksum
that does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
from torch import Tensor

from .file_errors import CorruptFileError
from .json_files import json_type_name, parse_json, sniff_format


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
            sniffed = sniff_format(head)
            raise error(path, f"not a safetensors file: {sniffed}" if sniffed else why)
        try:
            header = parse_json(f.read(claimed), path)
        except CorruptFileError as err:
            raise error(path, f"not a valid safetensors file (its header: {err.reason})") from None
    if not isinstance(header, dict):
        raise error(path, f"not a valid safetensors file (its header is a JSON {json_type_name(type(header))})")
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
