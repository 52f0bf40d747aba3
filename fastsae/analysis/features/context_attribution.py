"""Context attribution: which earlier tokens a feature's activation depends on.

For a context whose feature activation peaks at position p, each earlier token q in [first, p) is removed
(mode="remove": the sequence closes up and the peak moves to p - 1) or replaced by a neutral token
(mode="replace"), and the feature's activation at the peak is read again; the attribution of q is the
change, variant minus clean (negative: the feature needs that token). As in the seed paper's reading of
features ("removing the quote before ' said' drops the feature from 5.1 to 0"). Only the layers up to the
site run, and every variant of every context goes through the model in batches of `batch_size`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...latents import SparseLatents
from ...model import capture

MODES = ("remove", "replace")


@torch.no_grad()
def latent_value(decomposition, x: Tensor, latent: int) -> Tensor:
    """(N,) the latent's activation (positive part) on rows x (N, d)."""
    codes = decomposition.encode(x.to(getattr(decomposition, "dtype", x.dtype)))
    if isinstance(codes, SparseLatents):
        return torch.where(codes.indices == latent, codes.values, 0).sum(-1).clamp_min(0).float()
    return codes[..., latent].clamp_min(0).float()


@torch.no_grad()
def context_attribution(model: nn.Module, site: str, decomposition, latent: int, contexts: list[Tensor],
                        peaks: list[int], firsts: list[int], *, mode: str = "remove",
                        neutral_token_id: int | None = None, skip_token_ids: list[int] = (),
                        batch_size: int = 64) -> tuple[Tensor, list[Tensor]]:
    """contexts[b]: token ids (T_b,) up to at least the peak peaks[b]; tokens firsts[b] … peaks[b] - 1 are tried,
    except those in skip_token_ids (e.g. BOS: the model's attention sink). Returns (clean (B,) activation at
    each peak, [attribution (T_b,) per context: the change at each tried position, NaN elsewhere])."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "replace" and neutral_token_id is None:
        raise ValueError("mode='replace' needs neutral_token_id")
    if not len(contexts) == len(peaks) == len(firsts):
        raise ValueError(f"contexts, peaks and firsts must have one entry per context, got "
                         f"{len(contexts)}, {len(peaks)}, {len(firsts)}")
    device = next(model.parameters()).device
    skip = set(skip_token_ids)
    rows: list[Tensor] = []  # token ids of each forward row
    reads: list[int] = []  # the position read in that row
    owners: list[tuple[int, int]] = []  # (context, tried position), (-1 for the clean row)
    for b, (ids, peak, first) in enumerate(zip(contexts, peaks, firsts, strict=True)):
        if not 0 <= peak < ids.shape[0]:
            raise ValueError(f"peaks[{b}] = {peak} is outside its context of {ids.shape[0]} tokens")
        ids = ids[:peak + 1]
        rows.append(ids)
        reads.append(peak)
        owners.append((b, -1))
        for q in range(max(first, 0), peak):
            if int(ids[q]) in skip:
                continue
            if mode == "remove":
                rows.append(torch.cat([ids[:q], ids[q + 1:]]))
                reads.append(peak - 1)
            else:
                variant = ids.clone()
                variant[q] = neutral_token_id
                rows.append(variant)
                reads.append(peak)
            owners.append((b, q))
    values = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        length = max(r.shape[0] for r in batch)
        ids = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0])]) for r in batch])  # right-padded
        x = capture(model, [site], input_ids=ids.to(device))[site]  # (b, length, d)
        at = torch.tensor(reads[start:start + batch_size], device=x.device)
        values[start:start + len(batch)] = latent_value(decomposition, x[torch.arange(len(batch)), at], latent).cpu()
    clean = torch.zeros(len(contexts))
    out = [torch.full((ids.shape[0],), float("nan")) for ids in contexts]
    for (b, q), v in zip(owners, values.tolist(), strict=True):
        if q < 0:
            clean[b] = v
    for (b, q), v in zip(owners, values.tolist(), strict=True):
        if q >= 0:
            out[b][q] = v - clean[b]
    return clean, out
