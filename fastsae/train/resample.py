"""Dead-latent resampling, as Anthropic's "Towards Monosemanticity" (2023) describes it.

1. A latent is dead when it has not fired in the last W tokens.
2. Compute the reconstruction loss ℓ(x) = ||x - x_hat||² of the current SAE on a
   pool of recent inputs, and draw one input per dead latent with probability
   proportional to ℓ(x)² ("proportional to the square of the autoencoder's loss").
3. The dead latent's decoder row becomes the drawn (raw) input, unit-normalised.
4. Its encoder row becomes that normalised input times 0.2 times the mean
   encoder-row norm of the alive latents (multiplied, not divided).
5. Its encoder bias becomes 0, and its Adam moments (encoder row, decoder row,
   bias entry) are reset to 0.

Steps 3-5's rewrite is `fastsae.ops`' resample_rows, dispatched like every op:
one Triton kernel on CUDA, plain PyTorch elsewhere; both do the same writes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import backend_for
from ..sae import SAE

ENCODER_SCALE = 0.2  # Towards Monosemanticity, "Neuron Resampling"


@torch.no_grad()
def reconstruction_losses(sae: SAE, pool: Tensor, chunk: int = 4096) -> Tensor:
    """(P,) fp32 per-input squared reconstruction error ||x - x_hat||², in inference mode (so a
    BatchTopK SAE's recorded threshold is used, not updated)."""
    was_training = sae.training
    sae.eval()
    try:
        out = []
        for start in range(0, pool.shape[0], chunk):
            x = pool[start:start + chunk].to(sae.dtype)
            out.append((sae(x).x_hat.float() - x.float()).pow(2).sum(-1))
    finally:
        sae.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def draw_inputs(losses: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of n inputs drawn with probability ∝ loss² (uniformly if every loss is 0)."""
    weights = losses.double().pow(2)
    if not weights.sum() > 0:
        weights = torch.ones_like(weights)
    return torch.multinomial(weights, n, replacement=n > int((weights > 0).sum()), generator=generator)


def adam_state_rows(optimizer: torch.optim.Optimizer | None, sae: SAE) -> dict[str, Tensor] | None:
    """The Adam moments of W_dec, W_enc and b_enc, if the optimizer has taken a step."""
    if optimizer is None:
        return None
    names = {"dec": sae.W_dec, "b": sae.b_enc}
    if not sae.cfg.tied:
        names["enc"] = sae.W_enc
    state = {}
    for short, p in names.items():
        s = optimizer.state.get(p)
        if not s or "exp_avg" not in s:
            return None
        state[f"m_{short}"], state[f"v_{short}"] = s["exp_avg"], s["exp_avg_sq"]
    return state


@torch.no_grad()
def resample_dead_latents(sae: SAE, dead: Tensor, pool: Tensor, optimizer: torch.optim.Optimizer | None = None,
                          generator: torch.Generator | None = None) -> int:
    """Resample every latent where dead (d_sae,) is True from the inputs in pool (P, d_in). Returns how many."""
    if dead.shape != (sae.cfg.d_sae,) or dead.dtype != torch.bool:
        raise ValueError(f"dead must be a bool tensor of shape ({sae.cfg.d_sae},), "
                         f"got {dead.dtype} {tuple(dead.shape)}")
    if pool.dim() != 2 or pool.shape[1] != sae.cfg.d_in or pool.shape[0] == 0:
        raise ValueError(f"pool must have shape (P >= 1, d_in={sae.cfg.d_in}), got {tuple(pool.shape)}")
    latents = dead.nonzero().squeeze(1)
    n = latents.numel()
    if n == 0:
        return 0
    picks = draw_inputs(reconstruction_losses(sae, pool), n, generator)
    inputs = pool[picks].float()  # the raw inputs, not centred by b_dec
    directions = inputs / inputs.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    alive = ~dead
    alive_norm = sae.W_enc[alive].float().norm(dim=1).mean().item() if alive.any() else 1.0
    scale = ENCODER_SCALE * alive_norm
    W_enc = None if sae.cfg.tied else sae.W_enc
    state = adam_state_rows(optimizer, sae)
    backend_for(sae.device).resample_rows(latents, directions, sae.W_dec.data,
                                          None if W_enc is None else W_enc.data, sae.b_enc.data, scale, state)
    return n

