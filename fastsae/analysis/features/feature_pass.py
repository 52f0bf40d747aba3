"""Feature statistics in one streaming pass, saved as a "feature cache" that the browser and autointerp read.

    cache = collect_features(sae, StoreSource(store, site, windows), "runs/gemma/features")
    cache = FeatureCache.load("runs/gemma/features")
    cache.top(1234)                   # [Example]: the 20 contexts where latent 1234 is largest
    cache.samples(1234)               # [Example]: weaker activations, meta["quantile"] 0 (weakest) .. Q-1
    cache.random_examples(1234, 10, seed=0)   # random contexts, the latent's activation on them exact
    cache.stats(1234)                 # count, density, mean and max activation, histogram

What one pass keeps per latent (memory O(d_sae · n), whatever the token count; on the SAE's device):

    top-n contexts     the n sequences where the latent's maximum is largest, one context per sequence:
                       a window of `before` tokens before its maximum and `after` after it (shifted to stay
                       inside the sequence), with the latent's activation at every token
    samples            a uniform sample (bottom-n of a hash of (latent, sequence)) of the other sequences
                       where it fires, labelled by quantile of their maxima among the sample (Bills et al.
                       2023 and Paulo et al. 2024 score on such quantile-stratified contexts)
    token sample       a uniform sample of the tokens where it fires (value and token id; the bottom-n of a
                       hash of the row, so latents firing on the same token share priorities, which is
                       harmless for each latent's sample): the browser splits the histogram by token from it
    statistics         firing count, density (count / tokens), mean activation when firing, maximum, and a
                       histogram of B bins over [0, 2^e), 2^e the smallest power of two above the maximum
                       (kept exact while streaming: when the maximum passes 2^e, pairs of bins merge)
    random pool        `random_contexts` whole sequences (chosen by a hash of the sequence index) with their
                       full sparse codes, so any latent's activation on a random context is exact

Ties (top-n): the higher activation first; equal activations keep stream order (store rows: sequence,
then position), so the earlier token wins — within a sequence for its maximum, and between sequences.

A decomposition is anything with `encode(x) -> SparseLatents` or dense codes and a width: an SAE, or a
baseline of fastsae.evaluation.baselines (see decompositions.py; `SplitSigns` reads both signs). Sources
(sources.py): an activation store's shards, or corpus windows through the model. The cache's files and
reader: cache.py.

Cost: after the first chunks, each list drops the candidates that cannot beat its n-th entry with one
gather, so the pass costs about 1.5x the SAE's encoder on CPU (bench/features.py).

The pass is resumable: its state is checkpointed atomically between chunks (a store's shards, or groups
of corpus windows), and a resumed pass ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ... import io
from ..decompositions import SplitSigns, active_entries, directions_of, fingerprint, width_of
from .activation_chunks import Chunk, ModelSource, StoreSource, store_windows
from .feature_cache import FORMAT_VERSION, META_FILE, NO_EXPONENT, TENSORS_FILE, TIE_RULE, FeatureCache, write_vocab
from .topn import MASK32, BestN, fmix32, mix32, stable_order

__all__ = ["FeatureCache", "FeatureConfig", "FeaturePass", "ModelSource", "SplitSigns", "StoreSource",
           "active_entries", "collect_features", "directions_of", "store_windows", "width_of", "write_vocab"]
PARTIAL = "partial"
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


# ---- the pass ---------------------------------------------------------------------------------------


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
        dev, cfg, d = self.device, self.cfg, self.d_sae
        row, lat, val = row.to(dev), lat.to(dev), val.to(dev)
        sequence, position = chunk.sequence.to(dev), chunk.position.to(dev)
        grid = chunk.tokens.to(dev)
        S, T = grid.shape
        if T != self.T:
            raise ValueError(f"chunk has sequences of {T} tokens, the pass expects {self.T}")
        N = chunk.token_ids.shape[0]
        self.count += torch.bincount(lat, minlength=d)
        self.total.index_add_(0, lat, val.double())
        chunk_max = torch.zeros(d, device=dev).scatter_reduce(0, lat, val, "amax")
        self.max = torch.maximum(self.max, chunk_max)
        self._histogram(lat, val, chunk_max)
        seq_local = sequence[row] - chunk.first  # (M,)

        # token sample: a row's priority is shared by every latent firing there (uniform for each latent)
        tokens = chunk.token_ids.to(dev)
        token_key = -mix32(torch.arange(self.rows, self.rows + N, device=dev), cfg.seed)[row]
        keep = self.token_sample.could_enter(lat, token_key).nonzero().squeeze(1)
        self.token_sample.merge(lat[keep], token_key[keep],
                                lambda i: {"value": val[keep[i]], "token": tokens[row[keep[i]]]})

        rowgrid = torch.full((S, T), -1, dtype=torch.int64, device=dev)
        rowgrid[sequence - chunk.first, position] = torch.arange(N, device=dev)
        lookup = _RowLookup(row, lat, val, N, d)

        def candidates(keep: Tensor) -> tuple[Tensor, ...]:
            """Among entries keep, each latent's maximum within each sequence (earliest position on ties),
            grouped by (latent, sequence): stream order within each latent."""
            group = lat[keep] * S + seq_local[keep]
            order = stable_order(group, val[keep])
            group = group[order]
            first = torch.ones_like(group, dtype=torch.bool)
            first[1:] = group[1:] != group[:-1]
            best = keep[order[first]]
            return best, lat[best], seq_local[best], position[row[best]], val[best]

        def contexts(c_lat: Tensor, c_seq: Tensor, c_pos: Tensor) -> dict[str, Tensor]:
            start = (c_pos - cfg.before).clamp(0, T - self.W)
            tokens = torch.empty(c_lat.shape[0], self.W, dtype=torch.int32, device=dev)
            acts = torch.empty(c_lat.shape[0], self.W, device=dev)
            step = max(1, CONTEXT_BLOCK // self.W)  # bounds the int64 temporaries of the first chunks
            for a in range(0, c_lat.shape[0], step):
                s = c_seq[a:a + step, None]
                cols = start[a:a + step, None] + torch.arange(self.W, device=dev)  # (k, W)
                tokens[a:a + step] = grid[s, cols]
                acts[a:a + step] = lookup(rowgrid[s, cols], c_lat[a:a + step])
            return {"sequence": c_seq + chunk.first, "position": c_pos, "start": start, "tokens": tokens,
                    "acts": acts}

        # samples: a (latent, sequence) priority from a per-sequence hash mixed with the latent
        seq_hash = mix32(torch.arange(chunk.first, chunk.first + S, device=dev), cfg.seed + 1)
        res_key = -fmix32(seq_hash[seq_local] ^ ((lat * 0x9E3779B1) & MASK32))  # (M,)
        # one pass over the entries either list could take (all of them in the first chunks)
        keep = (self.top.could_enter(lat, val) | self.reservoir.could_enter(lat, res_key)).nonzero().squeeze(1)
        best, c_lat, c_seq, c_pos, c_val = candidates(keep)
        top = self.top.could_enter(c_lat, c_val).nonzero().squeeze(1)
        self.top.merge(c_lat[top], c_val[top], lambda i: contexts(c_lat[top[i]], c_seq[top[i]], c_pos[top[i]]))
        res = self.reservoir.could_enter(c_lat, res_key[best]).nonzero().squeeze(1)
        self.reservoir.merge(c_lat[res], res_key[best[res]],
                             lambda i: {"value": c_val[res[i]], **contexts(c_lat[res[i]], c_seq[res[i]],
                                                                           c_pos[res[i]])})
        self._pool(chunk.first, S, grid, sequence, position, row, lat, val)
        self.rows += N
        self.chunks += 1

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


# ---- running it ---------------------------------------------------------------------------------------


def _neighbours(directions: Tensor, k: int, block: int = 1024) -> tuple[Tensor, Tensor]:
    """(width, k) indices and cosines of each direction's k nearest others."""
    unit = directions.float()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, unit.shape[0] - 1)
    ids, cos = [], []
    for first in range(0, unit.shape[0], block):
        sim = unit[first:first + block] @ unit.T  # (b, width)
        sim[torch.arange(sim.shape[0]), torch.arange(first, first + sim.shape[0])] = float("-inf")
        top = sim.topk(k, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return torch.cat(ids).cpu(), torch.cat(cos).cpu()


def collect_features(decomposition, source, out: str | Path, cfg: FeatureConfig | None = None, *,
                     resume: bool = True, overwrite: bool = False, progress: bool = True, meta: dict | None = None,
                     stop_after: int | None = None) -> FeatureCache:
    """Run the pass over source (StoreSource or ModelSource) and write the feature cache into out.

    An interrupted pass continues from its last checkpoint when resume=True; a finished cache for the same
    decomposition, source and settings is returned as it is, one of other settings is replaced only when
    overwrite=True. stop_after=k stops after k chunks (checkpointed), as an interruption would (for tests).
    meta (JSON-able) is recorded with the cache."""
    cfg = cfg or FeatureConfig()
    out = Path(out)
    d_sae = width_of(decomposition)
    if isinstance(decomposition, nn.Module):
        decomposition.eval()  # BatchTopK reads its inference threshold
    device = getattr(decomposition, "device", None) or torch.device("cpu")
    identity = {"decomposition": fingerprint(decomposition), "source": source.describe(), "config": asdict(cfg)}
    if (out / META_FILE).is_file():
        done = io.read_json(out / META_FILE)
        if {k: done.get(k) for k in identity} == identity:
            return FeatureCache.load(out)
        if not overwrite:
            raise FileExistsError(f"{out} already holds a feature cache of another dictionary, source or settings: "
                                  f"pass another directory, or overwrite=True")
        (out / META_FILE).unlink()
    state = FeaturePass(d_sae, cfg, source.context_size, source.n_sequences, device)
    partial = out / PARTIAL
    if (partial / "progress.json").is_file() and (overwrite or not resume):
        (partial / "progress.json").unlink()
    if resume and (partial / "progress.json").is_file():
        saved = io.read_json(partial / "progress.json")
        if saved.get("identity") != identity:
            raise ValueError(f"{partial}: an interrupted pass of other settings (dictionary, source or config); "
                             f"delete it or write to another directory")
        state.load_state_dict(io.read_tensors(partial / "state.safetensors", device=str(device)))
    bar = tqdm(total=source.tokens, initial=state.rows, disable=not progress, desc="features", unit="tok",
               unit_scale=True)
    last_save = time.monotonic()

    def checkpoint() -> None:
        io.write_tensors(partial / "state.safetensors", state.state_dict())
        io.write_json(partial / "progress.json", {"format_version": FORMAT_VERSION, "identity": identity,
                                                  "chunks": state.chunks})  # the commit point

    for done, chunk in enumerate(source.chunks(state.chunks), start=state.chunks + 1):
        row, lat, val = active_entries(decomposition, chunk.x, cfg.batch_rows)
        if lat.numel() and int(lat.max()) >= d_sae:
            raise ValueError(f"{type(decomposition).__name__}.encode returned latent {int(lat.max())}, "
                             f"beyond its width {d_sae}")
        state.add(chunk, row, lat, val)
        bar.update(chunk.token_ids.shape[0])
        if time.monotonic() - last_save >= cfg.checkpoint_seconds or stop_after == done:
            checkpoint()
            last_save = time.monotonic()
        if stop_after == done:
            bar.close()
            raise KeyboardInterrupt(f"stopped after {done} chunks (stop_after)")
    bar.close()
    tensors = state.result()
    directions = directions_of(decomposition)
    if directions is not None and cfg.neighbours and d_sae > 1:
        tensors["neighbours.latent"], tensors["neighbours.cosine"] = _neighbours(directions, cfg.neighbours)
    io.write_tensors(out / TENSORS_FILE, tensors, metadata={"format_version": str(FORMAT_VERSION)})
    io.write_json(out / META_FILE, {
        "format_version": FORMAT_VERSION, **identity, "d_sae": d_sae, "tokens": state.rows,
        "sequences": source.n_sequences, "context_size": source.context_size, "window": state.W,
        "ties": TIE_RULE, "meta": meta or {}})  # the commit point
    for f in ("state.safetensors", "progress.json"):
        (partial / f).unlink(missing_ok=True)
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    return FeatureCache.load(out)
