"""The activation store: sharded safetensors files plus a JSON manifest, written so a harvest resumes.

    store/manifest.json        format_version, model, sites {name: d}, dtype, context_size, excluded token ids,
                               source (corpus, tokenizer settings), tokens, sequences_done,
                               norm_sums {site: sum of ||x||_2}, shards [{file, rows, sha256}]
    store/shard-00000.safetensors
        <site>     (rows, d)   activations, one tensor per site
        token_ids  (rows,)     the token at each vector's position (top-activating text needs them)
        sequence   (rows,)     index of the input sequence it came from
        position   (rows,)     its position in that sequence

Shards hold whole sequences and are written atomically; the manifest, replaced
atomically after each shard, is the commit point. A resumed harvest starts at
sequence `sequences_done`: no token is duplicated or missed, and the temporaries
and uncommitted shards of the killed harvest are removed. A writer holds the
store's lock (`io.DirectoryLock`): a second harvest into it is refused, naming
the first. Every shard is checked against its row count and SHA-256 when read;
a bad one raises CorruptShardError (a `io.CorruptFileError`), never silently, and
so does a damaged manifest.

Normalisation: the manifest keeps each site's running sum of vector norms, so
`mean_norm(site)` and `norm_scale(site)` = sqrt(d) / E||x|| (the factor that gives
inputs of mean norm sqrt(d), for which the default L1 coefficient is tuned; SAELens's
"expected_average_only_in") come for free. The loader applies it on request and the
trained SAE folds it into its weights (`SAE.fold_input_scale_`), so evaluation and
splicing see raw activations, with no scale to forget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import io

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_KEYS = ("token_ids", "sequence", "position")


def is_store(path: str | Path) -> bool:
    """Whether path is a store directory (it has a manifest): the one test every caller uses."""
    return (Path(path) / MANIFEST).is_file()


class CorruptShardError(io.CorruptFileError):
    """A shard is missing, truncated, or does not match its manifest entry."""


_MANIFEST_FIELDS = {"format_version": int, "model": str, "sites": dict, "dtype": str, "context_size": int,
                    "excluded_token_ids": list, "source": dict, "tokens": int, "sequences_done": int, "shards": list}
_SHARD_FIELDS = {"file": str, "rows": int, "sha256": str}


def read_manifest(path: Path) -> dict:
    """A store's manifest.json, every field checked; CorruptFileError naming the first bad one."""
    meta = io.read_json(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise io.CorruptFileError(path, f"format_version must be {FORMAT_VERSION}, got {meta.get('format_version')!r}")
    io.check_fields(meta, path, _MANIFEST_FIELDS)
    for site, d in meta["sites"].items():
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise io.CorruptFileError(path, f"sites[{site!r}] must be a positive integer width, got {d!r}")
    if not isinstance(getattr(torch, meta["dtype"], None), torch.dtype):
        raise io.CorruptFileError(path, f"field 'dtype' must name a torch dtype, got {meta['dtype']!r}")
    for i, shard in enumerate(meta["shards"]):
        if not isinstance(shard, dict):
            raise io.CorruptFileError(path, f"shards[{i}] must be a JSON object, got {shard!r}")
        io.check_fields(shard, path, _SHARD_FIELDS)
        if Path(shard["file"]).name != shard["file"] or shard["file"].startswith("."):
            raise io.CorruptFileError(path, f"shards[{i}].file must be a file name in the store, got {shard['file']!r}")
    norm_sums = meta.get("norm_sums", {})
    if not isinstance(norm_sums, dict) or (norm_sums and set(norm_sums) != set(meta["sites"])):
        raise io.CorruptFileError(path, f"norm_sums must have one entry per site {sorted(meta['sites'])}")
    return meta


@dataclass
class Shard:
    file: str
    rows: int
    sha256: str


class ActivationStore:
    """A harvested store, read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = read_manifest(self.path / MANIFEST)
        self.meta = meta
        self.sites: dict[str, int] = meta["sites"]
        self.shards = [Shard(**s) for s in meta["shards"]]
        self.tokens = sum(s.rows for s in self.shards)
        if self.tokens != meta["tokens"]:
            raise CorruptShardError(self.path / MANIFEST, f"shards hold {self.tokens} rows, manifest says "
                                                          f"{meta['tokens']}")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    def _site(self, site: str) -> str:
        if site not in self.sites:
            raise ValueError(f"site {site!r} is not in the store {self.path}; it has {sorted(self.sites)}")
        return site

    def mean_norm(self, site: str) -> float:
        """E||x||_2 over every vector of site in the store."""
        if self.tokens == 0:
            raise ValueError(f"store {self.path} is empty")
        if "norm_sums" not in self.meta:
            raise ValueError(f"store {self.path} has no norm statistics (harvested before they were kept): "
                             f"harvest it again, or train with normalize=False")
        sums = self.meta["norm_sums"]
        if self._site(site) not in sums:  # a prefix (above): measured on its own rows, once, shard by shard
            sums[site] = sum(float(self.load_shard(i, keys=(site,))[site].double().norm(dim=1).sum())
                             for i in range(len(self.shards)))
        return sums[site] / self.tokens

    def norm_scale(self, site: str) -> float:
        """The factor that makes site's vectors have mean norm sqrt(d)."""
        return math.sqrt(self.sites[self._site(site)]) / self.mean_norm(site)

    def load_shard(self, index: int, keys: tuple[str, ...] | None = None, verify: bool = True) -> dict[str, Tensor]:
        """The tensors of one shard (all, or keys), after checking it against the manifest."""
        shard = self.shards[index]
        path = self.path / shard.file
        if not path.is_file():
            raise CorruptShardError(path, "shard listed in the manifest is missing")
        if verify and io.sha256(path) != shard.sha256:
            raise CorruptShardError(path, "SHA-256 does not match the manifest (truncated or modified)")
        try:  # the header checked against the file's size first: one that claims 10 GB names this shard
            with io.open_tensors(path, error=CorruptShardError) as f:
                tensors = {k: f.get_tensor(k) for k in (keys or f.keys())}
        except CorruptShardError:
            raise
        except Exception as err:  # a key the shard lacks, a tensor torch cannot take
            raise CorruptShardError(path, f"unreadable ({err})") from err
        for key, t in tensors.items():
            if t.shape[0] != shard.rows:
                raise CorruptShardError(path, f"{key!r} has {t.shape[0]} rows, the manifest says {shard.rows}")
        return tensors

    def first_rows(self, site: str, n: int) -> Tensor:
        """The store's first n vectors of site (all of them when it holds fewer), in its dtype; reads only the
        shards it needs."""
        rows, got = [], 0
        for i in range(len(self.shards)):
            if got >= n:
                break
            rows.append(self.load_shard(i, keys=(self._site(site),))[site])
            got += rows[-1].shape[0]
        return torch.cat(rows)[:n] if rows else torch.empty(0, self.sites[self._site(site)], dtype=self.dtype)

    def prefix(self, n: int) -> ActivationStore:
        """The store's first whole shards holding >= n rows, as a store of their own: a training budget of n
        distinct vectors (the whole store when it holds fewer). Their norm statistics are measured on those
        rows, so a run on the first n rows is the same whatever a harvest still running appends after them."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"prefix: n must be an int >= 1, got {n!r}")
        count, rows = 0, 0
        while count < len(self.shards) and rows < n:
            rows, count = rows + self.shards[count].rows, count + 1
        if count == len(self.shards):
            return self
        view = copy.copy(self)
        view.shards, view.tokens = self.shards[:count], rows
        last = self.load_shard(count - 1, keys=("sequence",))["sequence"]
        view.meta = {**self.meta, "shards": self.meta["shards"][:count], "tokens": rows,
                     "sequences_done": int(last.max()) + 1, "norm_sums": {}}
        return view

    def verify(self) -> None:
        """Check every shard; raises CorruptShardError naming the first bad one."""
        for i in range(len(self.shards)):
            self.load_shard(i, keys=("token_ids",))


class StoreWriter:
    """Appends whole sequences' activations to a store, one atomic shard at a time. It holds the store's
    writer lock from construction to close() (a context manager too)."""

    def __init__(self, path: str | Path, *, model: str, sites: dict[str, int], dtype: torch.dtype, context_size: int,
                 excluded_token_ids: list[int], shard_rows: int = 65_536, resume: bool = False,
                 source: dict | None = None):
        self.path = Path(path)
        self.shard_rows = shard_rows
        self.lock = io.DirectoryLock(self.path, "harvest").acquire()
        try:
            self._open(model, sites, dtype, context_size, excluded_token_ids, resume, source)
        except BaseException:
            self.lock.release()
            raise
        self.dtype = dtype
        self._buffer: list[dict[str, Tensor]] = []
        self._buffered_rows = 0

    def _open(self, model, sites, dtype, context_size, excluded_token_ids, resume, source) -> None:
        manifest = self.path / MANIFEST
        fresh = {"format_version": FORMAT_VERSION, "model": model, "sites": sites,
                 "dtype": str(dtype).removeprefix("torch."), "context_size": context_size,
                 "excluded_token_ids": sorted(excluded_token_ids), "source": source or {}, "tokens": 0,
                 "sequences_done": 0, "norm_sums": dict.fromkeys(sites, 0.0), "shards": []}
        if manifest.exists():
            if not resume:
                raise FileExistsError(f"{self.path} already holds a store: pass resume=True, or another directory")
            self.meta = read_manifest(manifest)
            for key in ("model", "sites", "dtype", "context_size", "excluded_token_ids", "source"):
                if self.meta[key] != fresh[key]:
                    raise ValueError(f"{manifest}: cannot resume, {key} was {self.meta[key]!r}, now {fresh[key]!r}")
            listed = {s["file"] for s in self.meta["shards"]}
            for stray in self.path.glob("shard-*.safetensors"):  # written but never committed to the manifest
                if stray.name not in listed:
                    stray.unlink()
            io.remove_stale_temporaries(self.path)  # a killed writer's half-written shard or manifest
        else:
            self.meta = fresh
            io.write_json(manifest, self.meta)

    def close(self) -> None:
        """Give up the store's lock (flush() first to keep what is buffered)."""
        self.lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sequences_done(self) -> int:
        """Sequences committed to the manifest: a resumed harvest starts here."""
        return self.meta["sequences_done"]

    def add(self, acts: dict[str, Tensor], token_ids: Tensor, keep: Tensor, first_sequence: int) -> None:
        """acts[site] (B, T, d), token_ids and keep (B, T) for sequences first_sequence … first_sequence + B - 1."""
        B, T = token_ids.shape
        sequence = (torch.arange(B) + first_sequence)[:, None].expand(B, T)
        position = torch.arange(T)[None, :].expand(B, T)
        keep = keep.cpu()
        rows = {site: a.cpu()[keep].to(self.dtype) for site, a in acts.items()}
        rows.update(token_ids=token_ids.cpu()[keep], sequence=sequence[keep], position=position[keep].int())
        self._buffer.append(rows)
        self._buffered_rows += int(keep.sum())
        self._pending_sequences = first_sequence + B
        if self._buffered_rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered sequences as one shard and commit it to the manifest."""
        if not self._buffer:
            return
        tensors = {k: torch.cat([b[k] for b in self._buffer]) for k in self._buffer[0]}
        name = f"shard-{len(self.meta['shards']):05d}.safetensors"
        io.write_tensors(self.path / name, tensors)
        rows = tensors["token_ids"].shape[0]
        self.meta["shards"].append({"file": name, "rows": rows, "sha256": io.sha256(self.path / name)})
        self.meta["tokens"] += rows
        for site in self.meta["sites"]:  # float64, shard by shard: a resumed harvest sums in the same order
            self.meta["norm_sums"][site] += float(tensors[site].double().norm(dim=-1).sum())
        self.meta["sequences_done"] = self._pending_sequences
        io.write_json(self.path / MANIFEST, self.meta)  # the commit point
        self._buffer, self._buffered_rows = [], 0
