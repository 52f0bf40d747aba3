"""Per-latent best-n lists kept on device and merged chunk by chunk: the streaming core of the feature pass.

A `BestN` holds, for each of d_sae latents, the n candidates with the largest keys seen so far (keys
(d_sae, n): activations, or random priorities from `hash32` for uniform samples) and their payload
tensors (d_sae, n, ...). `merge` folds a chunk's M candidates (latent, key) in with two stable sorts
over M and one over (d_sae, 2n); payloads are computed only for the candidates that got in. Nothing
of size N × d_sae is ever formed.

Ties (the rule the brute-force test checks): equal keys keep stream order. A candidate already in the
list beats a new one, and among new ones the earlier in the order given wins. Callers pass candidates
in stream order, so on equal activations the earlier token of the stream wins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


def empty_key(dtype: torch.dtype) -> float | int:
    """The key of an empty slot: below every real key."""
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def stable_order(group: Tensor, key: Tensor) -> Tensor:
    """The permutation that sorts by group ascending, then key descending, ties kept in input order. One sort
    of packed int64 keys (group in the high 31 bits, the key's rank in the low 32) when both fit; two
    stable sorts otherwise."""
    if group.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=group.device)
    if key.dtype.is_floating_point:
        bits = key.float().view(torch.int32).long()
        key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # the float order, as integers
    hi, spread, top = key.max(), key.max() - key.min(), group.max()
    if int(spread) < 2**32 and 0 <= int(group.min()) and int(top) < 2**31:
        return torch.sort((group << 32) | (hi - key), stable=True).indices
    order = torch.sort(key, descending=True, stable=True).indices
    return order[torch.sort(group[order], stable=True).indices]


def best_per_latent(latent: Tensor, key: Tensor, n: int, d_sae: int) -> Tensor:
    """(d_sae, n) int64: for each latent, the indices into the M candidates of its n largest keys, best first
    (ties: earlier candidate first), -1 where it has fewer than n. latent, key: (M,)."""
    order = stable_order(latent, key)  # grouped by latent, best first inside
    lat = latent[order]
    counts = torch.bincount(lat, minlength=d_sae)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lat.numel(), device=lat.device) - starts[lat]
    keep = rank < n
    slots = torch.full((d_sae, n), -1, dtype=torch.int64, device=lat.device)
    slots[lat[keep], rank[keep]] = order[keep]
    return slots


class BestN:
    """keys (d_sae, n) sorted best first, and payload {name: (d_sae, n, *tail)}; empty slots hold empty_key
    and each payload's fill value."""

    def __init__(self, d_sae: int, n: int, key_dtype: torch.dtype, payload: dict[str, tuple[tuple, torch.dtype, float]],
                 device: torch.device | str = "cpu"):
        self.d_sae, self.n, self.specs = d_sae, n, payload
        self.keys = torch.full((d_sae, n), empty_key(key_dtype), dtype=key_dtype, device=device)
        self.payload = {name: torch.full((d_sae, n, *tail), fill, dtype=dtype, device=device)
                        for name, (tail, dtype, fill) in payload.items()}

    @property
    def valid(self) -> Tensor:
        """(d_sae, n) bool: which slots hold a candidate."""
        return self.keys != empty_key(self.keys.dtype)

    def could_enter(self, latent: Tensor, key: Tensor) -> Tensor:
        """(M,) bool: which candidates beat their latent's current n-th key (the others cannot enter: a tie
        loses to the candidate already there). Filtering with it first keeps the merge small."""
        return key.to(self.keys.dtype) > self.keys[latent, -1]

    def merge(self, latent: Tensor, key: Tensor, payload_of: Callable[[Tensor], dict[str, Tensor]]) -> None:
        """Fold in candidates latent, key (M,), given in stream order. payload_of(index (K,)) returns
        {name: (K, *tail)} for the K candidates (indices into the M) that entered a list. Only the rows of
        latents that have candidates are touched."""
        if latent.numel() == 0:
            return
        n = self.n
        fill = empty_key(self.keys.dtype)
        key = key.to(self.keys.dtype)
        present = torch.bincount(latent, minlength=self.d_sae) > 0  # no sort: O(M + d_sae)
        touched = present.nonzero().squeeze(1)  # (L,)
        local = (present.cumsum(0) - 1)[latent]  # (M,) row of each candidate's latent among the touched
        new_slots = best_per_latent(local, key, n, touched.numel())  # (L, n)
        new_keys = torch.where(new_slots >= 0, key[new_slots.clamp_min(0)], fill)
        both = torch.cat([self.keys[touched], new_keys], dim=1)  # old first: it wins ties
        order = torch.sort(both, dim=1, descending=True, stable=True).indices[:, :n]  # (L, n)
        self.keys[touched] = both.gather(1, order)
        from_new = order >= n
        entry = new_slots.gather(1, (order - n).clamp_min(0))
        taken = from_new & (entry >= 0)
        old = order.clamp_max(n - 1)
        fresh = payload_of(entry[taken])
        for name, t in self.payload.items():
            merged = t[touched[:, None], old]  # (L, n, *tail)
            merged[taken] = fresh[name].to(t.dtype)
            merged[from_new & ~taken] = self.specs[name][2]
            t[touched] = merged

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.keys": self.keys, **{f"{prefix}.{k}": v for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict[str, Tensor], prefix: str) -> None:
        device = self.keys.device
        self.keys = state[f"{prefix}.keys"].to(device)
        self.payload = {name: state[f"{prefix}.{name}"].to(device) for name in self.payload}


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for x in [0, 2^32) without overflowing int64: c is split into 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash32(a: Tensor, b: Tensor | int, seed: int) -> Tensor:
    """A deterministic pseudo-random int64 in [0, 2^32) per (a, b, seed), a and b non-negative int64 (broadcast).
    Bottom-n by this hash is a uniform sample without replacement that merges exactly (and resumes)."""
    b = torch.as_tensor(b, dtype=torch.int64, device=a.device)
    h = mix32(a, seed)
    if bool((b >> 32).any()):
        h = fmix32(h ^ (b >> 32))
    return fmix32(h ^ (b & MASK32))


def mix32(a: Tensor, seed: int) -> Tensor:
    """hash32 of one int64 tensor (the high half is mixed in only when some value needs it)."""
    h = fmix32((a & MASK32) ^ fmix32(torch.tensor((seed * 0x9E3779B1) & MASK32)).item())
    if bool((a >> 32).any()):
        h = fmix32(h ^ (a >> 32))
    return h
