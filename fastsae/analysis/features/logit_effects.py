"""What a feature does to the next-token prediction: its direct effect through the unembedding, and the
measured effect of removing it.

Direct effect (no forward pass): a latent's decoder direction d, passed through the final norm held at a
fixed scale and the unembedding, Δlogits ∝ W_U (g ⊙ P d), g the norm's gain and P the centring of a
LayerNorm (identity for RMSNorm). The norm's 1/rms(x) is a positive factor shared by every token, so the
ranking of promoted and suppressed tokens is exact under this approximation (later layers are ignored:
it is the *direct* path). Gemma's final logit soft-cap is monotone and left out too.
At an `mlp_hidden` site a direction lives in the MLP's hidden space: it reaches the residual stream through the
MLP's down-projection, d_resid = W_down d (down_projection), and then the path above (Gemma's
post-feedforward norm after W_down is left out, like the final norm's scale).
The histogram of a latent's direct logit changes over the vocabulary when it is ablated (the seed's figure;
removing the latent moves the logits by -W_U (g ⊙ P d)): "hist" (width, HIST_BINS) counts over equal bins from
"hist_lo" to "hist_hi" (width,) each.

Ablation effect (measured): the site's activation x becomes decode(z with latent j set to 0) + (x - decode(z)),
the reconstruction without that latent spliced with the SAE's error term, so that only that latent changes
(Bricken et al. 2023, "feature ablation"); the effect on each token is Δ log p(token | the tokens before it),
ablated minus clean. Clean and ablated forwards of all a feature's contexts run as one batch. A transcoder (site
its in-site) is ablated where it writes: its out-site's y becomes y + decode(z without j) - decode(z), z the codes
of the in-site's x (out_site=, or its metadata's "out_site"). Its direct effect is that of its decoder rows,
which it writes at the out-site.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ...latents import SparseLatents
from ...model import hook_sites, keep_mask, special_token_ids
from ..decompositions import transcoder_out_site

FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm")
DOWN_PROJECTIONS = ("dense_4h_to_h", "down_proj", "c_proj", "fc2")  # GPT-NeoX, Llama/Gemma, GPT-2, OPT-likes
HIST_BINS = 32  # bins of the logit-drop histogram: enough to show a heavy tail in the browser's small figure


def down_projection(model: nn.Module, site: str) -> Tensor:
    """(d_model, d_mlp) float32: the MLP down-projection of an mlp_hidden.L site's layer (GPT-2's Conv1D
    stores it transposed, (d_mlp, d_model): it is turned round)."""
    from ...model.sites import resolve

    kind, _, layer = site.partition(".")
    if kind != "mlp_hidden" or not layer.isdigit():
        raise ValueError(f"site must be mlp_hidden.L for a down-projection, got {site!r}")
    mlp = model.get_submodule(resolve(model, f"mlp_in.{layer}").module)
    for name in DOWN_PROJECTIONS:
        module = getattr(mlp, name, None)
        if module is not None and hasattr(module, "weight"):
            weight = module.weight.detach().float()
            return weight.T if type(module).__name__ == "Conv1D" else weight
    raise ValueError(f"{type(mlp).__name__} at {site}: no down-projection found (looked for {DOWN_PROJECTIONS})")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the unembedding (Llama/Gemma `norm`, GPT-NeoX `final_layer_norm`, GPT-2 `ln_f`)."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(model).__name__}: no final norm found (looked for {FINAL_NORMS} on its base model)")


@torch.no_grad()
def norm_gain(norm: nn.Module, d: int) -> tuple[Tensor, bool]:
    """(gain (d,), centres) of a LayerNorm/RMSNorm-like module, probed rather than read from its weights
    (Gemma stores 1 + w, others w): f(a) - f(-a) = 2 g ⊙ a for a zero-mean, unit-rms a; a norm centres its
    input when f(1) = f(0)."""
    param = next(norm.parameters(), None)
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    a = torch.tensor([1.0, -1.0], **kw).repeat((d + 1) // 2)[:d]
    a = a - a.mean()
    a = a / a.pow(2).mean().sqrt()
    gain = (norm(a[None])[0] - norm(-a[None])[0]) / (2 * a)
    constant = norm(torch.ones(1, d, **kw))[0] - norm(torch.zeros(1, d, **kw))[0]
    centres = bool(constant.abs().max() <= 1e-4 * gain.abs().max())
    return gain.float(), centres


@torch.no_grad()
def direct_logit_effects(model: nn.Module, directions: Tensor, k: int = 10, block: int = 512,
                         down: Tensor | None = None, bins: int = HIST_BINS) -> dict[str, Tensor]:
    """Top-k promoted and suppressed tokens of each direction (width, d): {"top_ids", "top_values",
    "bottom_ids", "bottom_values"}, each (width, k), the largest first / the most negative first, and the
    mean and std over the vocabulary of each direction's logit changes, "mean" and "std" (width,): the
    values' scale depends on the decoder's norm and the final norm's gain, (value - mean) / std does not.
    down: (d_model, d_mlp) the down-projection of an mlp_hidden site (directions (width, d_mlp)). Also the
    histogram of each latent's ablation logit changes, "hist" (width, bins), "hist_lo", "hist_hi" (width,)."""
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(model).__name__} has no unembedding (an encoder?): no direct logit effect")
    W_U = unembed.weight.float()  # (V, d)
    if down is not None:
        if down.shape[0] != W_U.shape[1] or down.shape[1] != directions.shape[1]:
            raise ValueError(f"down must be (d_model={W_U.shape[1]}, d_mlp={directions.shape[1]}), "
                             f"got {tuple(down.shape)}")
        directions = directions.to(down) @ down.T  # (width, d_model): the hidden direction written to the residual
    if directions.shape[1] != W_U.shape[1]:
        raise ValueError(f"directions have width {directions.shape[1]}, the residual stream has {W_U.shape[1]}: "
                         f"the direct effect needs a residual-stream site (not mlp_hidden)")
    gain, centres = norm_gain(final_norm(model), W_U.shape[1])
    k = min(k, W_U.shape[0])
    out: dict[str, list[Tensor]] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": [],
                                    "mean": [], "std": [], "hist": [], "hist_lo": [], "hist_hi": []}
    for first in range(0, directions.shape[0], block):
        d = directions[first:first + block].to(W_U)
        if centres:
            d = d - d.mean(dim=1, keepdim=True)
        logits = (d * gain) @ W_U.T  # (b, V)
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        out["top_ids"].append(top.indices.int().cpu())
        out["top_values"].append(top.values.cpu())
        out["bottom_ids"].append(bottom.indices.int().cpu())
        out["bottom_values"].append(bottom.values.cpu())
        out["mean"].append(logits.mean(dim=1).cpu())
        out["std"].append(logits.std(dim=1).cpu())
        for name, value in zip(("hist", "hist_lo", "hist_hi"), histogram(-logits, bins), strict=True):
            out[name].append(value.cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def histogram(values: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of values (b, V): counts (b, bins) int32 over bins equal bins from the row's min to its max
    (a value at the max goes in the last bin), and the (b,) lows and highs."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo, hi = values.min(dim=1).values, values.max(dim=1).values
    width = (hi - lo).clamp_min(1e-12)
    index = ((values - lo[:, None]) / width[:, None] * bins).long().clamp(0, bins - 1)  # (b, V)
    counts = torch.zeros(values.shape[0], bins, dtype=torch.int32, device=values.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts, lo, hi


def without_latent(decomposition, x: Tensor, latent: int, y: Tensor | None = None) -> Tensor:
    """decode(codes with latent set to 0) + (x - decode(codes)): x with only that latent removed. y: a
    transcoder's out-site activation (codes from x, its in-site's): y with only that latent's output removed."""
    dtype = getattr(decomposition, "dtype", x.dtype)
    x_in = x.to(dtype)
    target = x_in if y is None else y.to(dtype)
    codes = decomposition.encode(x_in)
    if isinstance(codes, SparseLatents):
        ablated = SparseLatents(torch.where(codes.indices == latent, 0.0, codes.values), codes.indices,
                                codes.d_sae)
    else:
        ablated = codes.clone()
        ablated[..., latent] = 0
    x_hat, x_hat_ablated = decomposition.decode(codes), decomposition.decode(ablated)
    return (x_hat_ablated + (target - x_hat)).to(x.dtype)


@torch.no_grad()
def ablation_effects(model: nn.Module, site: str, decomposition, latent: int, token_ids: Tensor,
                     exclude_token_ids: list[int] | None = None, positions: Tensor | None = None,
                     max_logits: int = 1 << 28, out_site: str | None = None) -> Tensor:
    """out[b, i] = log p_ablated(ids[b, t] | ids[b, :t]) - log p_clean(same) at t = positions[b, i] (default:
    every position, out (B, T)); NaN at t = 0. token_ids (B, T) may be right-padded (the model is causal:
    padding never changes earlier positions). Positions holding an excluded token (BOS/EOS/pad by default)
    keep their clean activation.

    Clean and ablated rows run together, and the unembedding runs only where a log-prob is read
    (`logits_to_keep`; Gemma's 262K-token unembedding costs more than the rest of the model). All B contexts
    go in one forward when their logits (2B · P · vocab floats) fit in max_logits (2^28: 1 GiB), else in as
    few forwards as fit."""
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be (B, T), got shape {tuple(token_ids.shape)}")
    B, T = token_ids.shape
    if positions is None:
        positions = torch.arange(T).expand(B, T)
    if positions.dim() != 2 or positions.shape[0] != B or bool((positions < 0).any() | (positions >= T).any()):
        raise ValueError(f"positions must be ({B}, P) indices into the {T} tokens, got {tuple(positions.shape)}")
    device = next(model.parameters()).device
    out_site = transcoder_out_site(decomposition, out_site)  # None: ablated where it reads
    excluded = special_token_ids(model) if exclude_token_ids is None else exclude_token_ids
    vocab = model.get_output_embeddings().weight.shape[0]
    sliced = "logits_to_keep" in inspect.signature(model.forward).parameters
    per_forward = max(1, max_logits // (2 * (positions.shape[1] if sliced else T) * vocab))
    effect = torch.full(positions.shape, float("nan"))
    read_in: list[Tensor] = []  # a transcoder's in-site x of the running forward, for its out-site hook
    for first in range(0, B, per_forward):
        ids = token_ids[first:first + per_forward].to(device)
        at = positions[first:first + per_forward].to(device)
        b = ids.shape[0]
        keep = keep_mask(ids, excluded)[..., None]

        def ablate(x: Tensor, keep: Tensor = keep, b: int = b) -> Tensor:  # (2b, T, d): clean rows, then ablated
            if out_site is not None:  # x is the out-site's y; the codes come from the in-site's x read before
                new = without_latent(decomposition, read_in.pop()[b:], latent, x[b:])
            else:
                new = without_latent(decomposition, x[b:], latent)
            return torch.cat([x[:b], torch.where(keep, new, x[b:])])

        hooks = {site: ablate} if out_site is None else {site: read_in.append, out_site: ablate}
        both, read = torch.cat([ids, ids]), torch.cat([at, at]) - 1  # the logits at t - 1 predict token t
        with hook_sites(model, hooks):
            if sliced:
                logits = model(input_ids=both, logits_to_keep=read.clamp_min(0)).logits  # (2b, P, V)
            else:
                logits = model(input_ids=both).logits
                logits = logits.gather(1, read.clamp_min(0)[..., None].expand(-1, -1, logits.shape[-1]))
        target = both.gather(1, read + 1)
        logp = logits.gather(-1, target[..., None])[..., 0].float() - torch.logsumexp(logits.float(), dim=-1)
        change = (logp[b:] - logp[:b]).cpu()
        effect[first:first + b] = torch.where(at.cpu() == 0, float("nan"), change)
    return effect
