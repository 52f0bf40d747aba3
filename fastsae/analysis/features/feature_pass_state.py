"""The feature pass's streaming state: `FeatureConfig` (what one pass keeps per latent) and `FeaturePass`, which
takes a chunk of codes at a time (`add`) and gives the feature cache's tensors at the end (`result`). What it keeps
and in what order ties fall: feature_pass.py, which runs it over a source and writes the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .activation_chunks import Chunk
from .feature_cache import NO_EXPONENT
from .topn import MASK32, BestN, fmix32, mix32, stable_order

CONTEXT_BLOCK = 1 << 22  # context tokens gathered at once (4M: ~100 MB of int64 temporaries)


@dataclass
class FeatureConfig:
    top: int = 20  # top-activating contexts per latent
    samples: int = 20  # weaker contexts per latent, quantile-labelled
    quantiles: int = 5
    before: int = 19  # tokens of context before the maximum (a window of before + 1 + after tokens)
    after: int = 4
    token_sample: int = 128  # firing tokens sampled per latent, to split the histogram by token
    random_contexts: int = 256  # sequences kept whole with their sparse codes
    histogram_bins: int = 64
    neighbours: int = 8  # nearest latents by decoder cosine
    seed: int = 0
    batch_rows: int = 8192  # rows encoded at once
    checkpoint_seconds: float = 120.0  # save the pass's state at most this often (and at the end)

    def __post_init__(self):
        for name in ("top", "quantiles", "histogram_bins", "batch_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"FeatureConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("samples", "before", "after", "token_sample", "random_contexts", "neighbours", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"FeatureConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.histogram_bins & (self.histogram_bins - 1):
            raise ValueError(f"FeatureConfig.histogram_bins must be a power of two (bins merge in pairs), "
                             f"got {self.histogram_bins}")



class _RowLookup:
    """A latent's value at given rows of a chunk, from its row-major entries (row, latent, value). Few queries
    scan their rows' entries (at most the widest row's L0 each); many (the first chunks, when every latent's
    lists fill) binary-search the entries sorted once by (row, latent)."""

    BLOCK = 1 << 22  # query × width elements per block of a scan

    def __init__(self, row: Tensor, lat: Tensor, val: Tensor, n_rows: int, d_sae: int):
        self.row, self.lat, self.val, self.d_sae = row, lat, val, d_sae
        counts = torch.bincount(row, minlength=n_rows)
        self.count = torch.cat([counts, counts.new_zeros(1)])  # a last, empty row answers queries of -1
        self.start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.start[-1] = 0
        self.width = max(int(counts.max()) if counts.numel() else 0, 1)
        self._sorted: tuple[Tensor, Tensor] | None = None

    def __call__(self, rows: Tensor, latent: Tensor) -> Tensor:
        """rows (K, W) (-1: no row), latent (K,) -> (K, W) float values (0 where the latent is off)."""
        K, W = rows.shape
        flat_rows, flat_lat = rows.reshape(-1), latent[:, None].expand(K, W).reshape(-1)
        if not self.lat.numel():
            return torch.zeros(K, W, device=rows.device)
        if flat_rows.numel() * self.width > 4 * self.lat.numel():
            return self._search(flat_rows, flat_lat).view(K, W)
        out = torch.zeros(flat_rows.shape, device=rows.device)
        step = max(1, self.BLOCK // self.width)
        slot = torch.arange(self.width, device=rows.device)
        for first in range(0, flat_rows.numel(), step):
            r = flat_rows[first:first + step]  # -1 indexes the empty last row
            at = self.start[r][:, None] + slot  # (q, width)
            inside = slot < self.count[r][:, None]
            at = torch.where(inside, at, 0)
            hit = inside & (self.lat[at] == flat_lat[first:first + step, None])
            out[first:first + step] = torch.where(hit, self.val[at], 0.0).sum(1)  # one term at most: exact
        return out.view(K, W)

    def _search(self, rows: Tensor, latent: Tensor) -> Tensor:
        if self._sorted is None:
            key, order = torch.sort(self.row * self.d_sae + self.lat)
            self._sorted = key, self.val[order]
        key, val = self._sorted
        query = rows * self.d_sae + latent
        at = torch.searchsorted(key, query).clamp_max(key.numel() - 1)
        return torch.where((rows >= 0) & (key[at] == query), val[at], 0.0)


class _ChunkWindows:
    """Context windows in one chunk: `before` tokens before a position and `after` after it (shifted to stay
    inside the sequence), with their token ids and a latent's activation at every token."""

    def __init__(self, chunk: Chunk, grid: Tensor, sequence: Tensor, position: Tensor, lookup: _RowLookup,
                 width: int, before: int):
        S, T = grid.shape
        self.grid, self.lookup, self.first, self.W, self.before, self.T = grid, lookup, chunk.first, width, before, T
        self.rowgrid = torch.full((S, T), -1, dtype=torch.int64, device=grid.device)  # (S, T): row of each token
        self.rowgrid[sequence - chunk.first, position] = torch.arange(sequence.shape[0], device=grid.device)

    def __call__(self, c_lat: Tensor, c_seq: Tensor, c_pos: Tensor) -> dict[str, Tensor]:
        """The windows of latents c_lat around positions c_pos of chunk sequences c_seq, each (K,)."""
        dev = self.grid.device
        start = (c_pos - self.before).clamp(0, self.T - self.W)
        tokens = torch.empty(c_lat.shape[0], self.W, dtype=torch.int32, device=dev)
        acts = torch.empty(c_lat.shape[0], self.W, device=dev)
        step = max(1, CONTEXT_BLOCK // self.W)  # bounds the int64 temporaries of the first chunks
        for a in range(0, c_lat.shape[0], step):
            s = c_seq[a:a + step, None]
            cols = start[a:a + step, None] + torch.arange(self.W, device=dev)  # (k, W)
            tokens[a:a + step] = self.grid[s, cols]
            acts[a:a + step] = self.lookup(self.rowgrid[s, cols], c_lat[a:a + step])
        return {"sequence": c_seq + self.first, "position": c_pos, "start": start, "tokens": tokens, "acts": acts}


def _sequence_maxima(keep: Tensor, lat: Tensor, seq_local: Tensor, val: Tensor, n_sequences: int) -> Tensor:
    """Among entries keep, each latent's maximum within each sequence (earliest position on ties), grouped by
    (latent, sequence): stream order within each latent. Returns the entries' indices."""
    group = lat[keep] * n_sequences + seq_local[keep]
    order = stable_order(group, val[keep])
    group = group[order]
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    return keep[order[first]]


class FeaturePass:
    """The streaming state: add() chunk by chunk, result() at the end. All tensors live on device."""

    def __init__(self, d_sae: int, cfg: FeatureConfig, context_size: int, n_sequences: int,
                 device: torch.device | str = "cpu"):
        self.d_sae, self.cfg, self.T, self.device = d_sae, cfg, context_size, torch.device(device)
        self.W = min(cfg.before + 1 + cfg.after, context_size)
        ctx = {"sequence": ((), torch.int64, -1), "position": ((), torch.int64, -1), "start": ((), torch.int64, -1),
               "tokens": ((self.W,), torch.int32, -1), "acts": ((self.W,), torch.float32, 0.0)}
        self.top = BestN(d_sae, cfg.top, torch.float32, ctx, self.device)
        # top + samples: the sample is drawn from sequences outside the top-n, which may take up to top slots
        self.reservoir = BestN(d_sae, cfg.top + cfg.samples, torch.int64,
                               {"value": ((), torch.float32, 0.0), **ctx}, self.device)
        self.token_sample = BestN(d_sae, max(cfg.token_sample, 1), torch.int64,
                                  {"value": ((), torch.float32, 0.0), "token": ((), torch.int32, -1)}, self.device)
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=self.device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=self.device)
        self.hist = torch.zeros(d_sae, cfg.histogram_bins, dtype=torch.int64, device=self.device)
        self.hist_exp = torch.full((d_sae,), NO_EXPONENT, dtype=torch.int64, device=self.device)
        priority = mix32(torch.arange(n_sequences, device=self.device), cfg.seed + 2)
        P = min(cfg.random_contexts, n_sequences)
        self.pool_sequence = torch.sort(torch.sort(priority, stable=True).indices[:P]).values  # (P,)
        self.pool_tokens = torch.full((P, context_size), -1, dtype=torch.int32, device=self.device)
        self.pool_entries: dict[str, list[Tensor]] = {"slot": [], "position": [], "latent": [], "value": []}
        self.rows = 0  # rows (tokens) seen
        self.chunks = 0


    @torch.no_grad()
    def add(self, chunk: Chunk, row: Tensor, lat: Tensor, val: Tensor) -> None:
        """One chunk and its positive codes (row into the chunk, latent, value), each (M,), in stream order.

        Each list first drops the candidates that cannot beat its current n-th entry (`could_enter`, a gather
        over M), so after the first chunks only a few candidates are sorted and merged."""
        dev = self.device
        row, lat, val = row.to(dev), lat.to(dev), val.to(dev)
        sequence, position = chunk.sequence.to(dev), chunk.position.to(dev)
        grid = chunk.tokens.to(dev)
        S, T = grid.shape
        if T != self.T:
            raise ValueError(f"chunk has sequences of {T} tokens, the pass expects {self.T}")
        N = chunk.token_ids.shape[0]
        self._statistics(lat, val)
        self._sample_tokens(chunk.token_ids.to(dev), row, lat, val)
        windows = _ChunkWindows(chunk, grid, sequence, position, _RowLookup(row, lat, val, N, self.d_sae), self.W,
                                self.cfg.before)
        self._top_and_samples(windows, sequence[row] - chunk.first, position[row], lat, val)
        self._pool(chunk.first, S, grid, sequence, position, row, lat, val)
        self.rows += N
        self.chunks += 1

    def _statistics(self, lat: Tensor, val: Tensor) -> None:
        """Firing count, sum and maximum per latent, and the histogram."""
        self.count += torch.bincount(lat, minlength=self.d_sae)
        self.total.index_add_(0, lat, val.double())
        chunk_max = torch.zeros(self.d_sae, device=self.device).scatter_reduce(0, lat, val, "amax")
        self.max = torch.maximum(self.max, chunk_max)
        self._histogram(lat, val, chunk_max)

    def _sample_tokens(self, token_ids: Tensor, row: Tensor, lat: Tensor, val: Tensor) -> None:
        """The token sample: a row's priority is shared by every latent firing there (uniform for each latent)."""
        N = token_ids.shape[0]
        token_key = -mix32(torch.arange(self.rows, self.rows + N, device=self.device), self.cfg.seed)[row]
        keep = self.token_sample.could_enter(lat, token_key).nonzero().squeeze(1)
        self.token_sample.merge(lat[keep], token_key[keep],
                                lambda i: {"value": val[keep[i]], "token": token_ids[row[keep[i]]]})

    def _top_and_samples(self, windows: _ChunkWindows, seq_local: Tensor, entry_pos: Tensor, lat: Tensor,
                         val: Tensor) -> None:
        """The top-n contexts and the sample of other sequences, from each latent's maximum per sequence.
        seq_local, entry_pos (M,): each entry's sequence in the chunk and position in it."""
        S = windows.rowgrid.shape[0]
        # samples: a (latent, sequence) priority from a per-sequence hash mixed with the latent
        seq_hash = mix32(torch.arange(windows.first, windows.first + S, device=self.device), self.cfg.seed + 1)
        res_key = -fmix32(seq_hash[seq_local] ^ ((lat * 0x9E3779B1) & MASK32))  # (M,)
        # one pass over the entries either list could take (all of them in the first chunks)
        keep = (self.top.could_enter(lat, val) | self.reservoir.could_enter(lat, res_key)).nonzero().squeeze(1)
        best = _sequence_maxima(keep, lat, seq_local, val, S)
        c_lat, c_seq, c_pos, c_val = lat[best], seq_local[best], entry_pos[best], val[best]
        top = self.top.could_enter(c_lat, c_val).nonzero().squeeze(1)
        self.top.merge(c_lat[top], c_val[top], lambda i: windows(c_lat[top[i]], c_seq[top[i]], c_pos[top[i]]))
        res = self.reservoir.could_enter(c_lat, res_key[best]).nonzero().squeeze(1)
        self.reservoir.merge(c_lat[res], res_key[best[res]],
                             lambda i: {"value": c_val[res[i]], **windows(c_lat[res[i]], c_seq[res[i]],
                                                                          c_pos[res[i]])})

    def _histogram(self, lat: Tensor, val: Tensor, chunk_max: Tensor) -> None:
        B = self.cfg.histogram_bins
        exponent = torch.frexp(chunk_max).exponent.long()  # chunk_max < 2^exponent
        fired = chunk_max > 0
        new_exp = torch.where(fired, torch.maximum(exponent, self.hist_exp), self.hist_exp)
        shift = torch.where(self.hist_exp == NO_EXPONENT, 0, new_exp - self.hist_exp).clamp(0, 62)
        index = torch.arange(B, device=self.device)[None, :] >> shift[:, None]  # bin i joins bin i >> shift
        self.hist = torch.zeros_like(self.hist).scatter_add_(1, index, self.hist)
        self.hist_exp = new_exp
        scaled = val * torch.exp2(-self.hist_exp[lat].float()) * B  # exact: powers of two
        b = scaled.floor().long().clamp(0, B - 1)
        self.hist.view(-1).index_add_(0, lat * B + b, torch.ones_like(b))

    def _pool(self, first: int, S: int, grid: Tensor, sequence: Tensor, position: Tensor, row: Tensor,
              lat: Tensor, val: Tensor) -> None:
        inside = (self.pool_sequence >= first) & (self.pool_sequence < first + S)
        if not inside.any():
            return
        slots = inside.nonzero().squeeze(1)
        self.pool_tokens[slots] = grid[self.pool_sequence[slots] - first].int()
        pooled = torch.isin(sequence[row], self.pool_sequence[slots])
        seq = sequence[row[pooled]]
        self.pool_entries["slot"].append(torch.searchsorted(self.pool_sequence, seq))
        self.pool_entries["position"].append(position[row[pooled]])
        self.pool_entries["latent"].append(lat[pooled])
        self.pool_entries["value"].append(val[pooled])

    # ---- state ----------------------------------------------------------------------------------------

    def _pool_tensors(self) -> dict[str, Tensor]:
        empty = {"slot": torch.int64, "position": torch.int64, "latent": torch.int64, "value": torch.float32}
        return {f"pool.{k}": torch.cat(v) if v else torch.zeros(0, dtype=empty[k], device=self.device)
                for k, v in self.pool_entries.items()}

    def state_dict(self) -> dict[str, Tensor]:
        state = {"count": self.count, "total": self.total, "max": self.max, "hist": self.hist,
                 "hist_exp": self.hist_exp, "pool.tokens": self.pool_tokens, "pool.sequence": self.pool_sequence,
                 "rows": torch.tensor(self.rows), "chunks": torch.tensor(self.chunks), **self._pool_tensors()}
        for name in ("top", "reservoir", "token_sample"):
            state.update(getattr(self, name).state_dict(name))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in ("count", "total", "max", "hist", "hist_exp"):
            setattr(self, name, state[name].to(self.device))
        self.pool_tokens = state["pool.tokens"].to(self.device)
        if not torch.equal(state["pool.sequence"].to(self.device), self.pool_sequence):
            raise ValueError("the saved pass chose other random contexts (another seed or number of sequences)")
        self.pool_entries = {k: [state[f"pool.{k}"].to(self.device)] for k in self.pool_entries}
        self.rows, self.chunks = int(state["rows"]), int(state["chunks"])
        for name in ("top", "reservoir", "token_sample"):
            getattr(self, name).load_state_dict(state, name)

    # ---- the result -------------------------------------------------------------------------------------

    def result(self) -> dict[str, Tensor]:
        """The cache's tensors (see FeatureCache), on the CPU."""
        cfg = self.cfg
        out = {"count": self.count, "mean": torch.where(self.count > 0, self.total / self.count.clamp_min(1), 0.0),
               "max": self.max, "histogram": self.hist, "histogram_exponent": self.hist_exp}
        valid = self.top.valid
        out["top.value"] = torch.where(valid, self.top.keys, 0.0)
        out.update({f"top.{k}": v for k, v in self.top.payload.items()})
        out.update(self._samples())
        sample_valid = self.token_sample.valid
        out["token_sample.value"] = torch.where(sample_valid, self.token_sample.payload["value"], 0.0)
        out["token_sample.token"] = torch.where(sample_valid, self.token_sample.payload["token"], -1)
        pool = self._pool_tensors()
        order = torch.argsort(pool["pool.slot"] * self.T + pool["pool.position"], stable=True)
        out.update({k: v[order] for k, v in pool.items()})
        out["pool.tokens"], out["pool.sequence"] = self.pool_tokens, self.pool_sequence
        if cfg.token_sample == 0:
            out = {k: v for k, v in out.items() if not k.startswith("token_sample.")}
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def _samples(self) -> dict[str, Tensor]:
        """The reservoir's first `samples` sequences outside the top-n, by activation, quantile-labelled."""
        res, n_s, Q = self.reservoir, self.cfg.samples, self.cfg.quantiles
        seq = res.payload["sequence"]
        in_top = ((seq[:, :, None] == self.top.payload["sequence"][:, None, :])
                  & self.top.valid[:, None, :]).any(-1)
        keep = res.valid & ~in_top
        rank = keep.cumsum(1) - 1
        keep &= rank < n_s
        slot = torch.full((self.d_sae, n_s), -1, dtype=torch.int64, device=self.device)
        r, c = keep.nonzero(as_tuple=True)
        slot[r, rank[r, c]] = c
        value = torch.where(slot >= 0, res.payload["value"].gather(1, slot.clamp_min(0)), float("-inf"))
        order = torch.sort(value, dim=1, descending=True, stable=True).indices  # strongest first
        slot = slot.gather(1, order)
        rows = torch.arange(self.d_sae, device=self.device)[:, None]
        taken = slot >= 0
        out = {}
        for name, t in res.payload.items():
            picked = t[rows, slot.clamp_min(0)]
            picked[~taken] = res.specs[name][2]
            out[f"samples.{name}"] = picked
        n = taken.sum(1, keepdim=True)  # (d_sae, 1)
        ascending = n - 1 - torch.arange(n_s, device=self.device)[None, :]  # rank from the weakest
        out["samples.quantile"] = torch.where(taken, ascending * Q // n.clamp_min(1), -1)
        return out
