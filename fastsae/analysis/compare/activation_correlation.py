"""Match two SAEs' latents by what they do rather than where they point: the Pearson correlation of their
activations over the same held-out tokens (the measure of Towards Monosemanticity's universality analysis).

    corr = activation_correlation(sae_a, sae_b, x)            # x (N, d_in): held-out activations at their site
    corr = correlation_on_store(sae_a, sae_b, store, site, n)  # x = the store's first n rows of site
    corr.summary()   # mean max correlation both ways over live latents, share >= tau, live/dead counts, N

What is computed. Each SAE encodes the N rows of x with its own encode (so a TopK latent is 0 where it is not in
the top k). For latent i of A, with activations a_i in R^N, and latent j of B, with b_j,

    corr(i, j) = <a_i - mean(a_i), b_j - mean(b_j)> / (||a_i - mean(a_i)|| ||b_j - mean(b_j)||)

(Pearson's r over the N tokens, no clipping or thresholding of the activations), and max_ab[i] = max_j corr(i, j)
with best_ab[i] its argmax over B's live latents (the lowest index on a tie), and the same from B to A. A latent
whose activation is the same on every token (in practice: it never fires) has no variance and so no correlation:
it is dead here, excluded from the means and the shares, its max is NaN and its best is -1, and the counts of
such latents are reported for both sides. The means are over live latents: mean_max_corr_ab = mean over A's live
latents of max_ab, frac_a_matched = share of A's live latents with max_ab >= tau.

Memory. Pearson's r of two rows is the cosine of the centred rows, so the centred codes, one (live, N) fp32
matrix per SAE with unit rows, go through direction_match.max_cosines, which never forms the d_a x d_b matrix
(tiles of 4096², reduced into running maxima). The centred codes are dense (centring fills every zero), so they
are computed once, in fp32: 4·d_sae·N bytes per SAE (1 GiB at 16,384 latents x 16,384 tokens). Rebuilding them
per tile from the sparse codes would save that memory but redo the scatter for every tile pair; at the sizes
`fastsae compare` serves the dense copy fits. Encoding goes in row chunks of about 2^24 dense entries, and the
centring in latent blocks of float64, so no temporary exceeds ~128 MiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .direction_match import BLOCK, max_cosines

CHUNK_ENTRIES = 1 << 24  # dense (rows x d_sae) entries per encoding chunk: 64 MiB fp32


@dataclass
class ActivationCorrelation:
    """The result of activation_correlation(a, b, x): each latent's best-correlated latent in the other SAE."""

    max_ab: Tensor  # (d_a,) float32: best Pearson r of each A latent with a live B latent; NaN when A's is dead
    best_ab: Tensor  # (d_a,) int64: which B latent; -1 when A's is dead
    max_ba: Tensor  # (d_b,)
    best_ba: Tensor  # (d_b,)
    tokens: int  # N
    tau: float

    @staticmethod
    def _live(mx: Tensor) -> Tensor:
        return mx[~mx.isnan()].double()

    def summary(self) -> dict:
        la, lb = self._live(self.max_ab), self._live(self.max_ba)
        return {"tokens": self.tokens, "tau": self.tau, "measure": "Pearson r of activations over the tokens",
                "live_a": int(la.numel()), "live_b": int(lb.numel()),
                "dead_a": int(self.max_ab.numel() - la.numel()), "dead_b": int(self.max_ba.numel() - lb.numel()),
                "mean_max_corr_ab": float(la.mean()), "mean_max_corr_ba": float(lb.mean()),
                "frac_a_matched": float((la >= self.tau).double().mean()),
                "frac_b_matched": float((lb >= self.tau).double().mean())}


@torch.no_grad()
def centred_codes(sae, x: Tensor) -> tuple[Tensor, Tensor]:
    """The SAE's codes on x (N, d_in), centred over the N rows and scaled to unit norm per latent:
    (live, N) float32, and the live latents' indices (live, ) int64 (those whose activation varies)."""
    n, d_sae = x.shape[0], sae.cfg.d_sae
    codes = torch.empty(d_sae, n, dtype=torch.float32)  # (d_sae, N): a latent's activations are one row
    lo = torch.full((d_sae,), math.inf)
    hi = torch.full((d_sae,), -math.inf)
    chunk = max(1, CHUNK_ENTRIES // d_sae)
    for s in range(0, n, chunk):
        dense = sae.encode(x[s:s + chunk].to(sae.device, sae.dtype)).to_dense().float().cpu()  # (rows, d_sae)
        codes[:, s:s + dense.shape[0]] = dense.T
        lo = torch.minimum(lo, dense.min(dim=0).values)
        hi = torch.maximum(hi, dense.max(dim=0).values)
    # exact test, not std > eps: a float64 mean of N equal values may miss them by an ulp and leave rounding noise
    live = (hi > lo).nonzero().squeeze(1)
    # drop the dead rows in place, block by block (codes[live] would hold a second copy): live[k] >= k, so a block
    # only overwrites rows that no later block reads
    for s in range(0, live.numel(), BLOCK):
        rows = live[s:s + BLOCK]
        codes[s:s + rows.numel()] = codes[rows]
    codes = codes[:live.numel()]  # (live, N)
    for s in range(0, codes.shape[0], BLOCK):
        blk = codes[s:s + BLOCK].double()
        blk -= blk.mean(dim=1, keepdim=True)
        codes[s:s + BLOCK] = (blk / blk.norm(dim=1, keepdim=True)).float()
    return codes, live


def _check(sae_a, sae_b, x: Tensor, tau: float) -> None:
    from ...sae import SAE

    for name, sae in (("sae_a", sae_a), ("sae_b", sae_b)):
        if not isinstance(sae, SAE):
            raise ValueError(f"{name} must be an SAE (activation correlation encodes with it), "
                             f"got {type(sae).__name__}")
    if sae_a.cfg.d_in != sae_b.cfg.d_in:
        raise ValueError(f"sae_a and sae_b must take the same d_in, got {sae_a.cfg.d_in} and {sae_b.cfg.d_in}")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != sae_a.cfg.d_in:
        raise ValueError(f"x must be (N, d_in={sae_a.cfg.d_in}) activations, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[0] < 2:
        raise ValueError(f"x must hold N >= 2 tokens for a correlation, got N = {x.shape[0]}")
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")


def _expand(mx: Tensor, best: Tensor, live: Tensor, other_live: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Best matches among live latents -> (n,) arrays over all latents: NaN / -1 for the dead ones."""
    full_max = torch.full((n,), math.nan)
    full_best = torch.full((n,), -1, dtype=torch.int64)
    full_max[live] = mx
    full_best[live] = other_live[best]
    return full_max, full_best


def activation_correlation(sae_a, sae_b, x: Tensor, *, tau: float = 0.9, block: int = BLOCK,
                           device: str | torch.device | None = None) -> ActivationCorrelation:
    """Each latent's best Pearson correlation with the other SAE's latents over the N rows of x (N, d_in), both
    ways (see the module docstring for exactly what is computed)."""
    _check(sae_a, sae_b, x, tau)
    ca, live_a = centred_codes(sae_a, x)
    cb, live_b = centred_codes(sae_b, x)
    for name, live in (("sae_a", live_a), ("sae_b", live_b)):
        if live.numel() == 0:
            raise ValueError(f"{name}: no latent varies over the {x.shape[0]} tokens (every one is silent or "
                             f"constant), so there is no correlation to measure")
    max_ab, best_ab, _, max_ba, best_ba, _ = max_cosines(ca, cb, block=block, device=device)
    del ca, cb
    max_ab, best_ab = _expand(max_ab, best_ab, live_a, live_b, sae_a.cfg.d_sae)
    max_ba, best_ba = _expand(max_ba, best_ba, live_b, live_a, sae_b.cfg.d_sae)
    return ActivationCorrelation(max_ab, best_ab, max_ba, best_ba, tokens=int(x.shape[0]), tau=tau)


def correlation_on_store(sae_a, sae_b, store, site: str, tokens: int, *, tau: float = 0.9,
                         device: str | torch.device | None = None) -> ActivationCorrelation:
    """activation_correlation on the first `tokens` rows of site in an ActivationStore (all of them when it
    holds fewer): held-out tokens when the store was harvested from a test split."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens must be an int >= 2, got {tokens!r}")
    check_site(store, site)
    x = store.first_rows(site, tokens)
    return activation_correlation(sae_a, sae_b, x, tau=tau, device=device)


def check_site(store, site: str) -> None:
    if site not in store.sites:
        raise ValueError(f"site {site!r} is not in the correlation store {store.path}; it has {sorted(store.sites)}")
