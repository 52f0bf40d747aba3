"""A loader that serves shuffled batches from every shard of a store, in bounded memory.

Each epoch visits the shards in a random order, `shards_in_memory` at a time:
their rows are concatenated and permuted together (so a batch mixes many
sequences, never one sequence's consecutive tokens), and leftover rows carry
into the next group, so every vector is served exactly once per epoch. A
background thread reads and verifies the next group while the current one is
served. The order depends only on the seed and the epoch.

normalize=True multiplies every vector by the store's norm_scale(site) (mean norm
sqrt(d)); `batches(steps)` runs whole epochs back to back for a fixed step count.

target_site (a transcoder's output site) serves (x, y) pairs: the two sites' rows of the same tokens,
read side by side (one (rows, d_x + d_y) block per group, so one permutation shuffles both) and split
on the way out; each is scaled by its own site's norm_scale (`target_scale`). Data parallel too: a rank reads
both sites' rows of its part. (Latent-sharded ranks are not data ranks: each loads the whole batch, world_size 1.)

sites (a crosscoder's, site being sites[0]) serves the concatenation of several sites' rows of the same tokens,
(batch, Σ d), each site scaled by its own norm_scale (`site_scales`, Anthropic normalises each layer apart), so
that layers of different norms weigh alike; read side by side as the pairs are, so data parallel too: a rank reads
every site's rows of its part.

Data parallel (rank, world_size): every rank draws the same order and serves its
own contiguous part of each batch (`tensor_split` of the batch into world_size
parts), so the ranks' batches of one step, joined in rank order, are the
single-process batch. A rank reads only its own rows of each shard (safetensors
slices of the memory-mapped file); each shard's SHA-256 is checked once per loader,
by the rank numbered shard index mod world_size, which reads that file whole.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .. import io
from .store import ActivationStore, CorruptShardError


class ShuffledLoader:
    def __init__(self, store: ActivationStore, site: str, batch_size: int, *, seed: int = 0, shards_in_memory: int = 4,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu", with_index: bool = False,
                 normalize: bool = False, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 target_site: str | None = None, sites: Sequence[str] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if site not in store.sites:
            raise ValueError(f"site {site!r} is not in the store; it has {sorted(store.sites)}")
        if target_site is not None and (target_site not in store.sites or with_index):
            raise ValueError(f"target_site must be a site of the store ({sorted(store.sites)}), without with_index; "
                             f"got {target_site!r}")
        sites = _check_sites(store, site, sites, target_site)
        if batch_size < 1 or shards_in_memory < 1:
            raise ValueError(f"batch_size and shards_in_memory must be >= 1, got {batch_size}, {shards_in_memory}")
        self.store, self.site, self.batch_size = store, site, batch_size
        self.seed, self.shards_in_memory = seed, shards_in_memory
        self.dtype, self.device, self.with_index = dtype or store.dtype, torch.device(device), with_index
        self.epoch = 0
        self.scale = store.norm_scale(site) if normalize and sites is None else 1.0  # sites: site_scales
        self.target_site = target_site
        self.target_scale = store.norm_scale(target_site) if normalize and target_site is not None else 1.0
        self.sites = sites
        self.site_scales = tuple(store.norm_scale(s) if normalize else 1.0 for s in sites or ())
        self._keys = tuple(sites or ()) or ((site,) if target_site is None else (site, target_site))
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self._verified: set[int] = set()  # shards this rank has checked (data parallel)
        offsets = [0]
        for shard in store.shards:
            offsets.append(offsets[-1] + shard.rows)
        self._offsets = offsets

    def __len__(self) -> int:
        full, rest = divmod(self.store.tokens, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def batches(self, steps: int) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Exactly steps batches, epoch after epoch (each epoch reshuffled). An epoch that yields no batch
        (an empty store, or batch_size above its rows with drop_last) is an error, not an endless loop."""
        if len(self) == 0:
            raise ValueError(f"ShuffledLoader: an epoch of {self.store.path} yields no batch: the store has "
                             f"{self.store.tokens} rows, batch_size is {self.batch_size}"
                             f"{' with drop_last' if self.drop_last else ''}; lower batch_size or harvest more")
        served = 0
        while served < steps:
            served_before = served
            for batch in self:
                yield batch
                served += 1
                if served == steps:
                    return
            if served == served_before:  # len() said otherwise: the store changed under us
                raise ValueError(f"ShuffledLoader: an epoch of {self.store.path} yielded no batch")

    def _groups(self, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.store.shards), generator=gen).tolist()
        for g in range(0, len(order), self.shards_in_memory):
            group = order[g:g + self.shards_in_memory]
            shards = [self.store.load_shard(i, keys=self._keys) for i in group]
            acts = torch.cat([torch.cat([shard[key] for key in self._keys], dim=1) for shard in shards])  # (rows, Σ d)
            index = torch.cat([torch.arange(self._offsets[i], self._offsets[i + 1]) for i in group])
            perm = torch.randperm(acts.shape[0], generator=gen)
            yield acts[perm], index[perm]

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        if self.world_size > 1:
            yield from self._rank_iter(gen)
            return
        ready: queue.Queue = queue.Queue(maxsize=1)  # one group read ahead: bounded memory
        done = object()

        def produce():
            try:
                for item in self._groups(gen):
                    ready.put(item)
                ready.put(done)
            except BaseException as err:  # surface a corrupt shard in the consumer
                ready.put(err)

        threading.Thread(target=produce, daemon=True).start()
        carry_acts = carry_index = None
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is done:
                break
            acts, index = item
            if carry_acts is not None:
                acts, index = torch.cat([carry_acts, acts]), torch.cat([carry_index, index])
            full = acts.shape[0] // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                yield self._out(acts[start:start + self.batch_size], index[start:start + self.batch_size])
            carry_acts, carry_index = acts[full:], index[full:]
        if carry_acts is not None and carry_acts.shape[0] and not self.drop_last:
            yield self._out(carry_acts, carry_index)

    # ---- data parallel: this rank's part of every batch ----------------------------------------------

    def _index_groups(self, gen: torch.Generator) -> Iterator[Tensor]:
        """The global row ids of each shard group, permuted: `_groups`'s order, from the same draws."""
        order = torch.randperm(len(self.store.shards), generator=gen).tolist()
        for g in range(0, len(order), self.shards_in_memory):
            index = torch.cat([torch.arange(self._offsets[i], self._offsets[i + 1])
                               for i in order[g:g + self.shards_in_memory]])
            yield index[torch.randperm(index.shape[0], generator=gen)]

    def _rank_groups(self, gen: torch.Generator) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Per shard group, this rank's (rows, ids) of each batch that completes in it (and the last one)."""
        carry = torch.zeros(0, dtype=torch.int64)
        for index in self._index_groups(gen):
            ids = torch.cat([carry, index])
            full = ids.shape[0] // self.batch_size * self.batch_size
            parts = [ids[s:s + self.batch_size].tensor_split(self.world_size)[self.rank]
                     for s in range(0, full, self.batch_size)]
            carry = ids[full:]
            yield self._read_parts(parts)
        if carry.shape[0] and not self.drop_last:
            yield self._read_parts([carry.tensor_split(self.world_size)[self.rank]])

    def _rank_iter(self, gen: torch.Generator) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        ready: queue.Queue = queue.Queue(maxsize=1)  # one group read ahead, as in the single-process path
        done = object()

        def produce():
            try:
                for item in self._rank_groups(gen):
                    ready.put(item)
                ready.put(done)
            except BaseException as err:
                ready.put(err)

        threading.Thread(target=produce, daemon=True).start()
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            for acts, index in item:
                yield self._out(acts, index)

    def _read_parts(self, parts: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Read the rows of every part (global ids) at once, shard by shard; return (rows, ids) per part."""
        ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        shard_of = torch.searchsorted(torch.tensor(self._offsets), ids, right=True) - 1
        width = sum(self.store.sites[key] for key in self._keys)  # the sites side by side, as _groups gives them
        out = torch.empty(ids.shape[0], width, dtype=self.store.dtype)
        for s in shard_of.unique().tolist():
            where = (shard_of == s).nonzero().squeeze(1)
            local = ids[where] - self._offsets[s]
            order = local.argsort()
            out[where[order]] = self._shard_rows(s, local[order])
        return list(zip(out.split([p.shape[0] for p in parts]), parts, strict=True))

    def _shard_rows(self, index: int, rows: Tensor) -> Tensor:
        """Rows (sorted local ids) of shard index, read from its memory-mapped file; the store's own checks
        (and errors) for a missing or short shard, and its SHA-256 once, on the rank that owns the check."""
        store, shard = self.store, self.store.shards[index]
        path = store.path / shard.file
        if index % self.world_size == self.rank and index not in self._verified:
            store.load_shard(index, keys=("token_ids",), verify=True)
            self._verified.add(index)
        if not path.is_file():
            store.load_shard(index, verify=False)  # raises CorruptShardError
        parts = []
        with io.open_tensors(path, error=CorruptShardError) as f:  # a bad header names the shard
            for key in self._keys:
                sliced = f.get_slice(key)
                if sliced.get_shape()[0] != shard.rows:
                    store.load_shard(index, keys=(key,), verify=False)  # raises CorruptShardError
                parts.append(sliced[rows.tolist()])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _out(self, acts: Tensor, index: Tensor):
        batch = acts.to(device=self.device, dtype=self.dtype, non_blocking=True)
        if self.target_site is not None:  # the two sites side by side: (x, y)
            x, y = batch.split([self.store.sites[self.site], self.store.sites[self.target_site]], dim=1)
            return x * self.scale, y * self.target_scale  # contiguous copies, not views of the joint block
        if self.sites is not None:  # a crosscoder's sites side by side, each times its own scale
            widths = [self.store.sites[s] for s in self.sites]
            scale = torch.tensor(self.site_scales, dtype=torch.float32, device=batch.device).repeat_interleave(
                torch.tensor(widths, device=batch.device))  # (Σ d,)
            batch = (batch * scale).to(self.dtype)
            return (batch, index) if self.with_index else batch
        if self.scale != 1.0:
            batch = batch * self.scale
        return (batch, index) if self.with_index else batch


def _check_sites(store: ActivationStore, site: str, sites: Sequence[str] | None,
                 target_site: str | None) -> tuple[str, ...] | None:
    """sites as a tuple (None stays None): >= 2 distinct sites of the store, the first being site, of one width,
    without target_site; else a ValueError naming sites. Any data rank: `_read_parts` reads every site's rows of
    its part side by side."""
    if sites is None:
        return None
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    unknown = [s for s in sites if s not in store.sites]
    if len(sites) < 2 or len(set(sites)) != len(sites) or unknown or sites[0] != site:
        raise ValueError(f"sites must be >= 2 distinct sites of the store ({sorted(store.sites)}), the first being "
                         f"site={site!r}; got {list(sites)}")
    if len({store.sites[s] for s in sites}) != 1:
        raise ValueError(f"sites must have one width (a crosscoder's per-site blocks are equal), got "
                         f"{ {s: store.sites[s] for s in sites} }")
    if target_site is not None:
        raise ValueError(f"sites: a crosscoder's sites are served without target_site, got target_site={target_site!r}")
    return sites
