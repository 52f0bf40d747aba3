"""Where the feature pass reads activations from: chunks of whole sequences, in stream order, from an
activation store (`StoreSource`) or from corpus windows through the model (`ModelSource`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Chunk:
    x: Tensor  # (N, d_in) activations at the site, rows in stream order
    token_ids: Tensor  # (N,) the token at each row
    sequence: Tensor  # (N,) int64 global sequence index, non-decreasing
    position: Tensor  # (N,) int64 position within the sequence
    tokens: Tensor  # (S, T) int64 token ids of sequences first … first + S - 1 (-1 where unknown)
    first: int


class StoreSource:
    """The shards of an activation store, one chunk each (shards hold whole sequences). windows (S, T): the
    harvested token windows (see `store_windows`); without them, positions the store left out (BOS, EOS,
    pad) have token id -1."""

    def __init__(self, store, site: str, windows: Tensor | None = None):
        if site not in store.sites:
            raise ValueError(f"site {site!r} is not in the store {store.path}; it has {sorted(store.sites)}")
        self.store, self.site, self.windows = store, site, windows
        self.context_size = store.meta["context_size"]
        self.n_sequences = store.meta["sequences_done"]
        self.n_chunks = len(store.shards)
        self.tokens = store.tokens
        if windows is not None and (windows.dim() != 2 or windows.shape[1] != self.context_size
                                    or windows.shape[0] < self.n_sequences):
            raise ValueError(f"windows must be (>= {self.n_sequences}, {self.context_size}) token ids (the store's "
                             f"sequences), got {tuple(windows.shape)}")

    def describe(self) -> dict:
        return {"kind": "store", "store": str(self.store.path.resolve()), "site": self.site,
                "model": self.store.meta.get("model"), "source": self.store.meta.get("source", {})}

    def chunks(self, start: int = 0) -> Iterator[Chunk]:
        for i in range(start, self.n_chunks):
            shard = self.store.load_shard(i, keys=(self.site, "token_ids", "sequence", "position"))
            seq, pos, ids = shard["sequence"].long(), shard["position"].long(), shard["token_ids"].long()
            first, last = int(seq.min()), int(seq.max())
            if self.windows is not None:
                grid = self.windows[first:last + 1].long()
                if not torch.equal(grid[seq - first, pos], ids):
                    raise ValueError(f"{self.store.path / self.store.shards[i].file}: its token ids differ from the "
                                     f"windows given (another corpus, tokenizer or window seed?)")
            else:
                grid = torch.full((last - first + 1, self.context_size), -1, dtype=torch.int64)
                grid[seq - first, pos] = ids
            yield Chunk(shard[self.site], ids, seq, pos, grid, first)


class ModelSource:
    """Corpus windows (S, T) through the model to the site, `chunk_windows` windows per chunk; positions
    holding an excluded token (BOS/EOS/pad by default) are left out, as a harvest would."""

    def __init__(self, model: nn.Module, site: str, windows: Tensor, *, batch_size: int = 8,
                 exclude_token_ids: list[int] | None = None, chunk_windows: int = 256, name: str | None = None):
        from ...model import special_token_ids

        if windows.dim() != 2:
            raise ValueError(f"windows must be (S, T) token ids, got shape {tuple(windows.shape)}")
        self.model, self.site, self.windows, self.batch_size = model, site, windows, batch_size
        self.excluded = special_token_ids(model) if exclude_token_ids is None else sorted(exclude_token_ids)
        self.chunk_windows = chunk_windows
        self.context_size, self.n_sequences = windows.shape[1], windows.shape[0]
        self.n_chunks = -(-self.n_sequences // chunk_windows)
        self.tokens = windows.numel()
        self.name = name

    def describe(self) -> dict:
        return {"kind": "model", "model": self.name or getattr(self.model.config, "_name_or_path", ""),
                "site": self.site, "windows": list(self.windows.shape), "excluded_token_ids": self.excluded}

    def chunks(self, start: int = 0) -> Iterator[Chunk]:
        from ...model import capture, keep_mask

        device = next(self.model.parameters()).device
        for c in range(start, self.n_chunks):
            first = c * self.chunk_windows
            grid = self.windows[first:first + self.chunk_windows].long()
            acts = torch.cat([capture(self.model, [self.site], input_ids=grid[i:i + self.batch_size].to(device))
                              [self.site] for i in range(0, grid.shape[0], self.batch_size)])
            keep = keep_mask(grid, self.excluded)
            S, T = grid.shape
            seq = (torch.arange(S) + first)[:, None].expand(S, T)[keep]
            pos = torch.arange(T)[None, :].expand(S, T)[keep]
            yield Chunk(acts[keep.to(acts.device)], grid[keep], seq, pos, grid, first)


def store_windows(store, tokenizer) -> Tensor | None:
    """The token windows a store was harvested from, rebuilt from the corpus settings in its manifest
    (None when it records none)."""
    from ...harvest.corpus import read_documents, token_windows

    source = store.meta.get("source") or {}
    if not source.get("corpus"):
        return None
    return token_windows(tokenizer, read_documents(source["corpus"], source.get("text_field", "text")),
                         source["context_size"], source.get("tokens"), seed=source.get("window_seed", 0))
