"""Edit a dictionary's latents inside a model's forward: ablate, scale, set, clamp, steer, or patch them from
another forward. Every other analysis tool (patching, erasure, circuits, steering) is built on this.

    with intervene(model, "resid_post.6", sae, zero=[12, 40]) as iv:
        logits = model(**batch.inputs()).logits      # the model runs with latents 12 and 40 removed

    with intervene(model, "resid_post.6", sae, patch=[3, 7], source=x_clean):   # clean -> corrupted
        logits = model(**corrupted.inputs()).logits

    with intervene(model, {"resid_post.5": Intervention(sae5, zero=[1]),          # several sites at once
                           "resid_post.6": Intervention(sae6, steer={4: 8.0})}):
        ...

Edits (each latent at most once per intervention; z_i is latent i's value at a position):
    zero=[i, ...]              z_i -> 0
    scale={i: c}               z_i -> c z_i
    set_to={i: v}              z_i -> v at every edited position, active there or not
    clamp={i: (lo, hi)}        z_i -> min(max(z_i, lo), hi); None leaves a side open
    steer={i: α}               z_i -> z_i + α, so x -> x + α W_dec[i] (latent i's steering vector)
    patch=[i, ...]             z_i -> z_i(source): the values of another forward, source = its activations
                               at this site, same (batch, seq, d) as the edited forward
    patch_error=True           also take source's error term x - x̂ (with every latent patched, x -> source)

How: the model runs on x̂_edited + (x - x̂), x̂ the decoding of the unedited codes. Decoding is linear, so
that is x + Σ_i (z'_i - z_i) W_dec[i] over the edited latents only: an empty intervention passes x through
untouched (bit for bit), and editing m latents costs a gather of m values per position from the sparse codes
and one (N, m) x (m, d) product; no (N, d_sae) tensor is built.

positions=(B, T) bool restricts every edit to some positions (tools pass the real, non-BOS tokens of a padded
batch). record=True keeps each forward's codes and inputs; grad=True keeps each forward's output at the
site in the autograd graph (iv.outputs) for attribution: torch.autograd.grad(metric, iv.outputs).

A transcoder (SAEConfig.kind "transcoder" / "skip_transcoder") reads its in-site and writes its out-site: its
codes come from the in-site's activation x, and the edit Σ_i (z'_i - z_i) W_dec[i] is added at the out-site (a
latent's decoder direction is written there; W_skip x is the same in both and cancels). `site` is then the
in-site (the metadata's "site"), the out-site is the metadata's "out_site" or out_site=; record keeps the codes
and the in-site's x; patch's source is the source forward's in-site activations; patch_error is refused (it would
need the source's out-site too). `hook_interventions` hooks both sites; `intervene` uses it.

The dictionary is an SAE, a baseline `Decomposition` (fastsae.evaluation.baselines; edited through all its
linear coefficients c = A (x - μ), not the top-k it keeps for reconstruction metrics), or any object with
the methods of `SAEDictionary`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ...latents import SparseLatents
from ...model import hook_sites
from ...sae import SAE
from ..decompositions import transcoder_out_site

# Rows of gathered decoder vectors per chunk in SAEDictionary.contributions: chunk·w·d floats stay near 16 MB.
CONTRIBUTION_CHUNK_FLOATS = 1 << 22


class SAEDictionary:
    """An SAE's latents as edit targets: sparse codes, and the values of chosen latents gathered from them."""

    def __init__(self, sae: SAE):
        if sae.training and sae.cfg.activation == "batchtopk":
            raise ValueError("a BatchTopK SAE in training mode selects latents across the batch and moves its "
                             "threshold: call sae.eval() before intervening")
        self.sae = sae
        self.size = sae.cfg.d_sae
        self.kind = sae.cfg.kind  # a transcoder's codes come from its in-site, its edits go to its out-site

    def codes(self, x: Tensor) -> SparseLatents:
        """(…, d) -> SparseLatents (…, w)."""
        return self.sae.encode(x.to(self.sae.dtype))

    def values(self, codes: SparseLatents, latents: Tensor) -> Tensor:
        """(…, m) values of latents (m,) at every position (0 where a latent is off), differentiable in
        codes.values. A lookup table of d_sae entries maps each active slot to its column; (…, w) work."""
        m = latents.shape[0]
        column = torch.full((self.size,), -1, dtype=torch.long, device=codes.indices.device)
        column[latents] = torch.arange(m, device=column.device)
        where = column[codes.indices]  # (…, w): column of each slot's latent, -1 if not chosen
        hit = where >= 0
        out = codes.values.new_zeros(*codes.values.shape[:-1], m)
        return out.scatter_add(-1, where.clamp_min(0), codes.values * hit)

    def directions(self, latents: Tensor) -> Tensor:
        """(m, d): the decoder rows of latents (what one unit of each adds to the activation)."""
        return self.sae.W_dec[latents]

    def reconstruct(self, codes: SparseLatents) -> Tensor:
        return self.sae.decode(codes)

    @torch.no_grad()
    def contributions(self, codes: SparseLatents, grad: Tensor) -> Tensor:
        """(d_sae,) float32 (or wider): Σ over positions of z_i · (grad · W_dec[i]), the first-order share of each
        latent in a metric whose gradient at the site is grad (…, d). Gathers the active rows in chunks."""
        w, d = codes.width, grad.shape[-1]
        acc = torch.promote_types(grad.dtype, torch.float32)
        values = codes.values.reshape(-1, w).to(acc)
        indices = codes.indices.reshape(-1, w)
        g = grad.reshape(-1, d).to(acc)
        out = torch.zeros(self.size, dtype=acc, device=grad.device)
        chunk = max(1, CONTRIBUTION_CHUNK_FLOATS // (w * d))
        for first in range(0, values.shape[0], chunk):
            rows = self.sae.W_dec[indices[first:first + chunk]].to(acc)  # (n, w, d)
            dots = torch.einsum("nwd,nd->nw", rows, g[first:first + chunk])
            out.index_add_(0, indices[first:first + chunk].flatten(), (values[first:first + chunk] * dots).flatten())
        return out


class BasisDictionary:
    """A linear decomposition (PCA, ICA, the neuron basis…) as edit targets: every coefficient
    c = A (x - μ) (dense, (…, n) with n ≤ d) is a latent, its direction the row of D."""

    def __init__(self, decomposition):
        self.name = getattr(decomposition, "name", "basis")
        self.D = decomposition.directions.float()  # (n, d)
        self.A = decomposition.analysis.float()  # (n, d)
        self.mean = decomposition.mean.float()  # (d,)
        self.size = self.D.shape[0]

    def codes(self, x: Tensor) -> Tensor:
        """(…, n) coefficients, in float32 or x's dtype if wider (float64 models stay exact)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        return (x.to(acc) - self.mean.to(x.device, acc)) @ self.A.to(x.device, acc).T

    def values(self, codes: Tensor, latents: Tensor) -> Tensor:
        return codes[..., latents]

    def directions(self, latents: Tensor) -> Tensor:
        return self.D[latents]

    def reconstruct(self, codes: Tensor) -> Tensor:
        return self.mean.to(codes.device, codes.dtype) + codes @ self.D.to(codes.device, codes.dtype)

    @torch.no_grad()
    def contributions(self, codes: Tensor, grad: Tensor) -> Tensor:
        acc = torch.promote_types(grad.dtype, torch.float32)
        g = grad.reshape(-1, grad.shape[-1]).to(acc) @ self.D.to(grad.device, acc).T  # (N, n)
        return (codes.reshape(-1, self.size).to(acc) * g).sum(0)


def as_dictionary(obj):
    """An SAE or a baseline Decomposition -> its dictionary adapter; adapters pass through."""
    if isinstance(obj, SAE):
        return SAEDictionary(obj)
    if all(hasattr(obj, name) for name in ("codes", "values", "directions", "reconstruct", "size")):
        return obj
    if all(hasattr(obj, name) for name in ("directions", "analysis", "mean")):
        return BasisDictionary(obj)
    raise TypeError(f"dictionary must be an SAE, a baselines.Decomposition or a dictionary adapter, "
                    f"got {type(obj).__name__}")


def _ids(name: str, latents: Iterable, size: int) -> list[int]:
    ids = [int(i) for i in (latents.tolist() if isinstance(latents, Tensor) else latents)]
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise ValueError(f"{name}: latent ids must be in [0, {size}), got {bad[:5]}")
    return ids


class Intervention:
    """What to do at one site, and what it saw there (see the module docstring for the edits)."""

    def __init__(self, dictionary, *, zero: Iterable[int] = (), scale: Mapping[int, float] | None = None,
                 set_to: Mapping[int, float] | None = None,
                 clamp: Mapping[int, tuple[float | None, float | None]] | None = None,
                 steer: Mapping[int, float] | None = None, patch: Iterable[int] | Tensor = (),
                 source: Tensor | None = None, patch_error: bool = False, positions: Tensor | None = None,
                 record: bool = False, grad: bool = False, out_site: str | None = None):
        self.dictionary = as_dictionary(dictionary)
        self.out_site = transcoder_out_site(dictionary, out_site)  # None: an SAE, edited where it reads
        if self.out_site is not None and patch_error:
            raise ValueError("patch_error: a transcoder's error term is at its out-site, from another forward's "
                             "out-site activations; patch its latents (patch=) instead")
        self._codes_in: tuple | None = None  # a transcoder's (x, codes), read at its in-site for its out-site
        size = self.dictionary.size
        ops = [("zero", _ids("zero", zero, size), None, None)]
        for kind, given in (("scale", scale), ("set", set_to), ("steer", steer)):
            given = dict(given or {})
            ops.append((kind, _ids(kind, given, size), [float(v) for v in given.values()], None))
        clamp = dict(clamp or {})
        for i, bounds in clamp.items():
            if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
                raise ValueError(f"clamp: latent {i} needs (lo, hi) bounds (None for an open side), got {bounds!r}")
        ops.append(("clamp", _ids("clamp", clamp, size),
                    [-float("inf") if lo is None else float(lo) for lo, _ in clamp.values()],
                    [float("inf") if hi is None else float(hi) for _, hi in clamp.values()]))
        ops.append(("patch", _ids("patch", patch, size), None, None))
        latents = [i for _, ids, _, _ in ops for i in ids]
        if len(set(latents)) != len(latents):
            twice = sorted({i for i in latents if latents.count(i) > 1})
            raise ValueError(f"latents {twice[:5]} are edited more than once; give each latent one edit")
        if (ops[-1][1] or patch_error) and source is None:
            raise ValueError("patch / patch_error need source=: the activations at this site of the forward to "
                             "patch from, shaped like the edited forward's (batch, seq, d)")
        self.latents = torch.tensor(latents, dtype=torch.long)  # (m,) every edited latent
        first, self._ops = 0, []
        for kind, ids, a, b in ops:  # columns [first, first + len(ids)) of the (…, m) values
            if ids:
                self._ops.append((kind, slice(first, first + len(ids)), a, b))
            first += len(ids)
        self.source, self.source_codes, self.patch_error = source, None, patch_error
        self.positions, self.record, self.grad = positions, record, grad
        self.codes: list = []  # record: the codes of every forward, in order
        self.inputs: list[Tensor] = []  # record: the activations at the site before the edit
        self.outputs: list[Tensor] = []  # grad: the site's output (edited), in the autograd graph
        self.edits: list[Tensor] = []  # record: the edit added to the activation (…, d), per forward

    def _mask(self, x: Tensor) -> Tensor | None:
        if self.positions is None:
            return None
        mask = self.positions.to(x.device)
        if mask.shape == x.shape[:-1]:
            return mask
        if mask.dim() == 2 and x.dim() == 3 and x.shape[0] == mask.shape[0] and x.shape[1] == 1:
            return None  # cached generation: one new token per row, never BOS or padding
        raise ValueError(f"positions must have shape {tuple(x.shape[:-1])} (batch, seq), got {tuple(mask.shape)}")

    def _source_codes(self, x: Tensor):
        if self.source.shape != x.shape:
            raise ValueError(f"source must have the edited forward's shape {tuple(x.shape)}, "
                             f"got {tuple(self.source.shape)}")
        if self.source_codes is None:
            with torch.no_grad():
                self.source_codes = self.dictionary.codes(self.source.to(x.device))
        return self.source_codes

    def _new_values(self, old: Tensor, x: Tensor) -> Tensor:
        """(…, m) edited values of self.latents from their old values."""
        new = old.clone()
        for kind, cols, a, b in self._ops:
            if kind == "zero":
                new[..., cols] = 0
            elif kind == "scale":
                new[..., cols] = old[..., cols] * old.new_tensor(a)
            elif kind == "set":
                new[..., cols] = old.new_tensor(a).expand_as(old[..., cols])
            elif kind == "steer":
                new[..., cols] = old[..., cols] + old.new_tensor(a)
            elif kind == "clamp":
                new[..., cols] = torch.maximum(torch.minimum(old[..., cols], old.new_tensor(b)), old.new_tensor(a))
            else:  # patch
                ids = self.latents[cols].to(x.device)
                new[..., cols] = self.dictionary.values(self._source_codes(x), ids).to(old.dtype)
        return new

    def _needs_codes(self) -> bool:
        only_steer = all(kind == "steer" for kind, *_ in self._ops) and not self.patch_error
        return self.record or not only_steer  # steering adds α W_dec[i] whatever z_i is: no encoder pass

    def read(self, x: Tensor) -> None:
        """A transcoder's in-site hook: its codes from x (recorded here, so a forward stopped before the
        out-site still records them), kept for the out-site call of the same forward."""
        codes = self.dictionary.codes(x) if self._needs_codes() else None
        self._codes_in = (x, codes)
        if self.record:
            self.codes.append(codes if self.grad else _detach(codes))
            self.inputs.append(x.detach())

    def _codes_for(self, x: Tensor):
        """The codes that edit the activation x at the hooked site: x's own (an SAE), or the in-site's."""
        if self.out_site is None:
            return self.dictionary.codes(x) if self._needs_codes() else None
        if self._codes_in is None:
            raise RuntimeError(f"intervene: the transcoder's out-site {self.out_site!r} was reached before its "
                               f"in-site in this forward")
        (x_in, codes), self._codes_in = self._codes_in, None  # each in-site read serves one out-site call
        if self.source is not None and self.source.shape != x_in.shape:
            raise ValueError(f"source must have the in-site's shape {tuple(x_in.shape)}, "
                             f"got {tuple(self.source.shape)}")
        return codes

    def __call__(self, x: Tensor) -> Tensor | None:
        acc = torch.promote_types(x.dtype, torch.float32)
        mask = self._mask(x)
        codes = self._codes_for(x)
        edit = None
        if self._ops:
            latents = self.latents.to(x.device)
            if codes is None:  # steering adds α W_dec[i] whatever z_i is: no encoder pass needed
                old = x.new_zeros(*x.shape[:-1], latents.shape[0], dtype=acc)
            else:
                old = self.dictionary.values(codes, latents).to(acc)
            delta = self._new_values(old, x) - old  # (…, m)
            edit = delta @ self.dictionary.directions(latents).to(device=x.device, dtype=acc)  # (…, d)
        if self.patch_error:
            source = self.source.to(x.device)
            with torch.no_grad():
                src_error = source.to(acc) - self.dictionary.reconstruct(self._source_codes(x)).to(acc)
            error_delta = src_error - (x.to(acc) - self.dictionary.reconstruct(codes).to(acc))
            edit = error_delta if edit is None else edit + error_delta
        if edit is not None and mask is not None:
            edit = edit * mask[..., None]
        out = x if edit is None else x + edit.to(x.dtype)
        if self.record:
            if self.out_site is None:  # a transcoder records its codes and x at its in-site (read)
                self.codes.append(codes if self.grad else _detach(codes))
                self.inputs.append(x.detach())
            self.edits.append(torch.zeros_like(x) if edit is None else edit.detach().to(x.dtype))
        if self.grad:
            if not out.requires_grad:
                out = out.detach().requires_grad_()
            out.retain_grad()
            self.outputs.append(out)
        return None if out is x else out


def _detach(codes):
    return codes.detach() if codes is not None else None


@contextmanager
def intervene(model: nn.Module, site: str | Mapping[str, Intervention], dictionary=None,
              **edits) -> Iterator[Intervention | dict[str, Intervention]]:
    """Within the block, every forward of model runs with the edits at site (see the module docstring).
    One site: intervene(model, site, sae, **edits) yields its Intervention. Several:
    intervene(model, {site: Intervention(...)}) yields the dict."""
    if isinstance(site, Mapping):
        if dictionary is not None or edits:
            raise ValueError("intervene: pass either {site: Intervention} or one site with its dictionary and edits")
        for name, iv in site.items():
            if not isinstance(iv, Intervention):
                raise TypeError(f"intervene: site {name!r} must map to an Intervention, got {type(iv).__name__}")
        with hook_interventions(model, dict(site)):
            yield dict(site)
        return
    if dictionary is None:
        raise ValueError("intervene: a single site needs its dictionary (an SAE or a baseline decomposition)")
    iv = Intervention(dictionary, **edits)
    with hook_interventions(model, {site: iv}):
        yield iv


def intervention_hooks(interventions: Mapping[str, Intervention]) -> dict[str, object]:
    """{site: hook}: each SAE's Intervention at its site; a transcoder's read at its in-site (the key) and its
    Intervention at its out-site. A site hooked twice is refused (one edit per site and forward)."""
    hooks: dict[str, object] = {}
    for site, iv in interventions.items():
        pairs = [(site, iv)] if iv.out_site is None else [(site, iv.read), (iv.out_site, iv)]
        for name, fn in pairs:
            if name in hooks:
                raise ValueError(f"intervene: site {name!r} would be hooked twice (a transcoder's in- or out-site "
                                 f"is another intervention's site); edit it with one intervention")
            hooks[name] = fn
    return hooks


@contextmanager
def hook_interventions(model: nn.Module, interventions: Mapping[str, Intervention]) -> Iterator[None]:
    """Within the block, every forward of model runs the interventions ({site: Intervention}, transcoders
    hooked at both their sites)."""
    with hook_sites(model, intervention_hooks(interventions)):
        yield
