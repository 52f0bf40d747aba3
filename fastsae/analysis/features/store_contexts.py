"""Top-activating contexts read straight from an activation store, for the tools that already hold a
dictionary's codes on the store's rows (connect, compare) and need a few features' contexts without a
feature cache: every stored vector keeps its token id, window and position, and a window's kept rows
are stored together and in order (fastsae.harvest.store).

    codes = encode_store(sae, store, "mlp_out.6")          # SparseLatents (N, w) over every stored row
    rows = top_rows(codes, feature=30, n=10)               # (≤ n,) the rows where it is largest
    examples = StoreContexts(store, tokenizer).examples(codes, 30, rows)   # [Example], as the feature cache
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...latents import SparseLatents
from .feature_contexts import Example


@torch.no_grad()
def encode_store(sae, store, site: str, *, batch_size: int = 8192, device: str | torch.device = "cpu",
                 progress: bool = False) -> SparseLatents:
    """The SAE's codes on every row of site, in store order: SparseLatents (N, w), w the widest row
    (TopK: k). Memory N·w, never N·d_sae. The SAE takes raw activations (the store's scale is folded in)."""
    from tqdm.auto import tqdm

    if site not in store.sites:
        raise ValueError(f"site {site!r} is not in the store {store.path}; it has {sorted(store.sites)}")
    if store.sites[site] != sae.cfg.d_in:
        raise ValueError(f"the SAE takes d_in={sae.cfg.d_in} but site {site!r} has d={store.sites[site]}")
    sae = sae.to(device).eval()
    values, indices = [], []
    bar = tqdm(total=store.tokens, disable=not progress, desc=f"encode {site}", unit="tok", unit_scale=True)
    for shard in range(len(store.shards)):
        x = store.load_shard(shard, keys=(site,))[site]
        for start in range(0, x.shape[0], batch_size):
            lat = sae.encode(x[start:start + batch_size].to(device, sae.dtype))
            values.append(lat.values.float().cpu())
            indices.append(lat.indices.cpu())
            bar.update(lat.values.shape[0])
    bar.close()
    width = max(v.shape[1] for v in values)
    pad = lambda t, w: torch.nn.functional.pad(t, (0, w - t.shape[1]))  # value 0 at index 0: inert padding
    return SparseLatents(torch.cat([pad(v, width) for v in values]), torch.cat([pad(i, width) for i in indices]),
                         sae.cfg.d_sae)


def feature_column(codes: SparseLatents, feature: int) -> Tensor:
    """(N,) one feature's activation on every row."""
    if not 0 <= feature < codes.d_sae:
        raise ValueError(f"feature must be in [0, {codes.d_sae}), got {feature}")
    return (codes.values * (codes.indices == feature)).sum(-1)


def top_rows(codes: SparseLatents, feature: int, n: int) -> Tensor:
    """(≤ n,) int64 rows where feature is largest, largest first; rows where it is off are left out."""
    col = feature_column(codes, feature)
    vals, rows = col.topk(min(n, col.shape[0]))
    return rows[vals > 0]


class StoreContexts:
    """Token windows around stored rows: the ids, sequences and positions of a store, held once (3 int64 per row)."""

    def __init__(self, store, tokenizer, before: int = 12, after: int = 4):
        meta = [store.load_shard(i, keys=("token_ids", "sequence", "position")) for i in range(len(store.shards))]
        self.token_ids = torch.cat([m["token_ids"] for m in meta]).long()  # (N,)
        self.sequence = torch.cat([m["sequence"] for m in meta]).long()  # (N,)
        self.position = torch.cat([m["position"] for m in meta]).long()  # (N,)
        self.tokenizer, self.before, self.after = tokenizer, before, after

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"

    def window(self, row: int) -> Tensor:
        """(w,) rows of the same sequence within before/after positions of row (kept rows only, in order)."""
        lo, hi = max(0, row - self.before - 1), min(self.sequence.shape[0], row + self.after + 1)
        rows = torch.arange(lo, hi)
        p = self.position[row]
        near = (self.sequence[rows] == self.sequence[row]) & (self.position[rows] >= p - self.before) & \
               (self.position[rows] <= p + self.after)
        return rows[near]

    def examples(self, codes: SparseLatents, feature: int, rows: Tensor) -> list[Example]:
        """An Example per row: the window around it, with feature's activation at each of its tokens."""
        out = []
        for row in rows.tolist():
            win = self.window(row)
            acts = feature_column(SparseLatents(codes.values[win], codes.indices[win], codes.d_sae), feature)
            ids = self.token_ids[win].tolist()
            out.append(Example(token_ids=ids, tokens=[self.token(i) for i in ids],
                               activations=[round(float(a), 4) for a in acts], window=int(self.sequence[row]),
                               start=int(self.position[win[0]]), meta={"row": row}))
        return out
