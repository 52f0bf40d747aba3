"""Drop an SAE into a model: replace the activation at a site by the SAE's reconstruction, for any forward.

    with splice(model, "resid_post.6", sae, record=True) as sp:
        logits = model(input_ids).logits          # the model runs on x_hat at resid_post.6
    sp.latents[0]                                 # SparseLatents (batch, seq, w) of that forward

    splice(model, site, sae, error_term=True)      # x_hat + (x - x_hat): equals the clean model, but the
                                                   # SAE's latents sit in the graph (for attribution/patching)
    splice(model, site, replace="zero")            # zero ablation; replace=mean_vector for mean ablation,
    splice(model, site, replace=fn)                # or any x -> x_hat (a baseline decomposition)

`sp.keep = mask` (batch, seq) restricts the replacement to some positions (evaluation keeps
BOS/pad positions clean, as it excludes them from the store). Recorded latents are detached
unless error_term is set; with record=True, `sp.activations` holds the clean inputs and
`sp.reconstructions` the x_hat of every position (before keep and the error term).

    with splice_transcoder(model, "mlp_in.6", "mlp_out.6", tc) as sp:   # a transcoder replaces the MLP:
        model(input_ids)                          # mlp_out.6 becomes decode(encode(x)) [+ skip(x)], x = mlp_in.6

The in-site hook only records x; the out-site hook replaces y from it (the MLP's input is reached before its
output in every forward). keep, record (activations = the clean y) and error_term work as for splice.

    with splice_crosscoder(model, sites, cc, input_ids=ids) as sp:   # a crosscoder replaces all its sites:
        model(input_ids=ids)                      # every site l becomes x̂_l, decoded from the clean x of all sites

A crosscoder is acausal (site 3's reconstruction reads site 9), so entering runs one clean forward on the inputs
given, records the sites and reconstructs them; the forwards in the block see every site replaced by its block of
x̂. keep, record (activations / reconstructions: all sites side by side) and error_term work as for splice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..sae import SAE
from .hooks import capture, hook_site, hook_sites


class Splice:
    def __init__(self, sae, replace, error_term: bool, record: bool):
        if sae is None and replace is None:
            raise ValueError("splice needs an sae or replace= ('zero', a mean vector, or a callable)")
        if sae is not None and replace is not None:
            raise ValueError("splice takes an sae or replace=, not both")
        if error_term and sae is None and not callable(replace):
            raise ValueError("error_term=True needs a reconstruction (an sae or a callable replace=)")
        self.sae, self.replace, self.error_term, self.record = sae, replace, error_term, record
        self.keep: Tensor | None = None
        self.latents: list = []
        self.activations: list[Tensor] = []
        self.reconstructions: list[Tensor] = []

    def _reconstruct(self, x: Tensor) -> Tensor:
        if self.sae is not None:
            latents = self.sae.encode(x.to(getattr(self.sae, "dtype", x.dtype)))
            if self.record:
                self.latents.append(latents if self.error_term else latents.detach())
            return self.sae.decode(latents).to(x.dtype)
        if isinstance(self.replace, str):
            if self.replace != "zero":
                raise ValueError(f"replace must be 'zero', a mean vector or a callable, got {self.replace!r}")
            return torch.zeros_like(x)
        if isinstance(self.replace, Tensor):
            if self.replace.shape != x.shape[-1:]:
                raise ValueError(f"replace vector must have shape ({x.shape[-1]},), got {tuple(self.replace.shape)}")
            return self.replace.to(device=x.device, dtype=x.dtype).expand_as(x)
        return self.replace(x).to(x.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        if self.record:
            self.activations.append(x.detach())
        x_hat = self._reconstruct(x)
        if self.record:
            self.reconstructions.append(x_hat.detach())
        if self.error_term:
            x_hat = x_hat + (x - x_hat).detach()
        if self.keep is not None:
            keep = self.keep.to(x.device)
            if keep.shape != x.shape[:-1]:
                raise ValueError(f"keep must have shape {tuple(x.shape[:-1])}, got {tuple(keep.shape)}")
            x_hat = torch.where(keep[..., None], x_hat, x)
        return x_hat


@contextmanager
def inference_mode_of(sae) -> Iterator[None]:
    """The dictionary in eval mode within the block, its mode restored after: a spliced dictionary encodes each
    row on its own (a BatchTopK SAE by its learnt threshold, not by the batch's top N·k, which the BOS rows of
    huge norm that evaluation keeps clean would otherwise take most of)."""
    was_training = isinstance(sae, nn.Module) and sae.training
    if was_training:
        sae.eval()
    try:
        yield
    finally:
        if was_training:
            sae.train()


@contextmanager
def splice(model: nn.Module, site: str, sae: SAE | None = None, *, replace: str | Tensor | Callable | None = None,
           error_term: bool = False, record: bool = False) -> Iterator[Splice]:
    """Within the block, every forward of model sees the replacement at site (a named site or module path).
    sae: an SAE, or anything with encode(x) / decode(codes) (a baseline decomposition)."""
    state = Splice(sae, replace, error_term, record)
    with inference_mode_of(sae), hook_site(model, site, state):
        yield state


class TranscoderSplice(Splice):
    """A Splice whose reconstruction of the out-site's y comes from the x its in-site hook recorded."""

    def __init__(self, sae, error_term: bool, record: bool):
        kind = getattr(getattr(sae, "cfg", None), "kind", None)
        if kind not in ("transcoder", "skip_transcoder"):
            raise ValueError(f"splice_transcoder needs a transcoder (SAEConfig.kind 'transcoder' or "
                             f"'skip_transcoder'), got kind={kind!r}; splice an SAE with splice()")
        super().__init__(sae, None, error_term, record)
        self.x: Tensor | None = None

    def read(self, x: Tensor) -> None:
        self.x = x

    def _reconstruct(self, y: Tensor) -> Tensor:
        if self.x is None:
            raise RuntimeError("splice_transcoder: the out-site was reached before the in-site in this forward")
        x, self.x = self.x.to(getattr(self.sae, "dtype", y.dtype)), None  # each x serves one out-site call
        latents = self.sae.encode(x)
        if self.record:
            self.latents.append(latents if self.error_term else latents.detach())
        y_hat = self.sae.decode(latents)
        if self.sae.cfg.kind == "skip_transcoder":  # decode is the dictionary's part; forward adds W_skip x
            y_hat = y_hat + self.sae.skip(x)
        return y_hat.to(y.dtype)


@contextmanager
def splice_transcoder(model: nn.Module, in_site: str, out_site: str, sae: SAE, *, error_term: bool = False,
                      record: bool = False) -> Iterator[TranscoderSplice]:
    """Within the block, every forward of model sees the transcoder's prediction from in_site's activation in
    place of out_site's (e.g. mlp_in.6 -> mlp_out.6: the MLP replaced by the transcoder)."""
    state = TranscoderSplice(sae, error_term, record)
    with inference_mode_of(sae), hook_sites(model, {in_site: state.read, out_site: state}):
        yield state


class CrosscoderSplice(Splice):
    """Each of a crosscoder's sites replaced by its block of x̂, reconstructed from one clean forward (`prepare`)."""

    def __init__(self, sae, sites: list[str], error_term: bool, record: bool):
        cfg = getattr(sae, "cfg", None)
        if getattr(cfg, "kind", None) != "crosscoder" or len(sites) != cfg.n_sites:
            raise ValueError(f"splice_crosscoder needs a crosscoder (SAEConfig.kind 'crosscoder') and one site per "
                             f"n_sites, got kind={getattr(cfg, 'kind', None)!r} and sites {list(sites)}")
        super().__init__(sae, None, error_term, record)
        self.sites, self.blocks = list(sites), {}

    @torch.no_grad()
    def prepare(self, model: nn.Module, **inputs) -> None:
        """The clean forward: every site's activation (B, T, d), side by side, reconstructed by the crosscoder."""
        acts = capture(model, self.sites, **inputs)
        x = torch.cat([acts[s] for s in self.sites], dim=-1)  # (B, T, L·d)
        latents = self.sae.encode(x.to(self.sae.dtype))
        x_hat = self.sae.decode(latents).to(x.dtype)
        if self.record:
            self.latents.append(latents)
            self.activations.append(x)
            self.reconstructions.append(x_hat)
        self.blocks = dict(zip(self.sites, x_hat.split(x.shape[-1] // len(self.sites), dim=-1), strict=True))

    def site_hook(self, site: str) -> Callable[[Tensor], Tensor]:
        """x (B, T, d) at site -> its reconstruction (with the error term and keep, as Splice)."""
        def replace(x: Tensor) -> Tensor:
            x_hat = self.blocks[site]
            if self.error_term:
                x_hat = x_hat + (x - x_hat).detach()
            if self.keep is not None:
                x_hat = torch.where(self.keep.to(x.device)[..., None], x_hat, x)
            return x_hat
        return replace


@contextmanager
def splice_crosscoder(model: nn.Module, sites: list[str], sae: SAE, *, error_term: bool = False, record: bool = False,
                      **inputs) -> Iterator[CrosscoderSplice]:
    """Run model(**inputs) clean once, then within the block every forward sees each of sites replaced by the
    crosscoder's reconstruction of it from that clean forward (module docstring); inputs: e.g. input_ids=ids."""
    state = CrosscoderSplice(sae, sites, error_term, record)
    with inference_mode_of(sae):
        state.prepare(model, **inputs)
        with hook_sites(model, {site: state.site_hook(site) for site in state.sites}):
            yield state
