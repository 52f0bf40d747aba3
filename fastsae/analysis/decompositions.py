"""What the analysis tools accept as a dictionary: anything with `encode(x) -> SparseLatents` or dense codes
(..., width) and a width (`cfg.d_sae`, `d_sae` or `d_codes`) — an SAE, or a baseline of
fastsae.evaluation.baselines (PCA, ICA, neurons). A code's activation is its value where positive;
`SplitSigns` reads both directions of a signed baseline as separate features. A transcoder (SAEConfig.kind
"transcoder" / "skip_transcoder") encodes its in-site and writes its out-site (`transcoder_out_site`).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from ..latents import SparseLatents


def width_of(decomposition) -> int:
    """How many latents (codes) a decomposition has."""
    for get in (lambda d: d.cfg.d_sae, lambda d: d.d_sae, lambda d: d.d_codes):
        try:
            return int(get(decomposition))
        except AttributeError:
            continue
    raise TypeError(f"{type(decomposition).__name__}: a decomposition needs a width (cfg.d_sae, d_sae or d_codes)")


def directions_of(decomposition) -> Tensor | None:
    """(width, d_in) decoder directions (W_dec rows, or a baseline's directions), or None."""
    for name in ("W_dec", "directions"):
        value = getattr(decomposition, name, None)
        if isinstance(value, Tensor):
            return value.detach()
    return None


class SplitSigns:
    """A signed decomposition (PCA, ICA, neurons) read as 2·n features: i is the positive side of code i,
    n + i the negative side."""

    def __init__(self, decomposition):
        self.inner = decomposition
        self.d_codes = 2 * width_of(decomposition)
        self.dtype = getattr(decomposition, "dtype", torch.float32)
        inner = directions_of(decomposition)
        self.directions = None if inner is None else torch.cat([inner, -inner])

    def encode(self, x: Tensor) -> Tensor:
        c = self.inner.encode(x)
        c = c.to_dense() if isinstance(c, SparseLatents) else c
        return torch.cat([c.clamp_min(0), (-c).clamp_min(0)], dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        n = self.d_codes // 2
        return self.inner.decode(codes[..., :n] - codes[..., n:])


@torch.no_grad()
def active_entries(decomposition, x: Tensor, batch_rows: int = 8192) -> tuple[Tensor, Tensor, Tensor]:
    """The positive codes of x (N, d_in) as (row, latent, value), each (M,), in stream order (row-major)."""
    dtype = getattr(decomposition, "dtype", x.dtype)
    device = getattr(decomposition, "device", x.device)
    rows, lats, vals = [], [], []
    for first in range(0, x.shape[0], batch_rows):
        codes = decomposition.encode(x[first:first + batch_rows].to(device=device, dtype=dtype))
        if isinstance(codes, SparseLatents):
            on = codes.values > 0  # (n, w): padding slots hold 0
            row = torch.arange(on.shape[0], device=on.device)[:, None].expand_as(on)[on]
            lat, val = codes.indices[on], codes.values[on]
        elif isinstance(codes, Tensor):
            row, lat = (codes > 0).nonzero(as_tuple=True)
            val = codes[row, lat]
        else:
            raise TypeError(f"{type(decomposition).__name__}.encode must return SparseLatents or a Tensor, "
                            f"got {type(codes).__name__}")
        rows.append(row + first)
        lats.append(lat.long())
        vals.append(val.float())
    return torch.cat(rows), torch.cat(lats), torch.cat(vals)


def fingerprint(decomposition) -> str:
    """SHA-256 of a decomposition's tensors: a resumed pass must read the same dictionary."""
    if isinstance(decomposition, SplitSigns):
        return "split:" + fingerprint(decomposition.inner)
    tensors = decomposition.state_dict() if isinstance(decomposition, nn.Module) else \
        {k: v for k, v in vars(decomposition).items() if isinstance(v, Tensor)}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def transcoder_out_site(dictionary, out_site: str | None = None) -> str | None:
    """A transcoder's out-site (out_site, else its metadata's "out_site"); None for an SAE or a basis, which
    must not be given one."""
    sae = getattr(dictionary, "sae", dictionary)  # an adapter (latent_edits.SAEDictionary) or the SAE
    kind = getattr(getattr(sae, "cfg", None), "kind", "sae")
    if kind == "sae":
        if out_site is not None:
            raise ValueError(f"out_site: only a transcoder writes another site; this dictionary is an SAE "
                             f"(got out_site={out_site!r})")
        return None
    out_site = out_site or getattr(sae, "metadata", {}).get("out_site")
    if not out_site:
        raise ValueError(f"out_site: this {kind} does not record its output site (metadata 'out_site'); pass "
                         f"out_site= (e.g. 'mlp_out.6')")
    return out_site
