"""`SAEEnsemble`: E SAEs of one shape trained on the same batches, with one optimizer pass per step.

The members' weights are stacked along the latents, (E·d_sae, d_in), so the
optimizer (SAEAdam) updates every member in one pass over the stacked
parameters. The forward runs each member through the public ops
(`fastsae.ops`: the fused Triton kernels on CUDA, sparse PyTorch elsewhere) on
its block of the stacked weights, and its loss through `fastsae.losses.loss_terms`:
the very code of a single SAE, so on CPU each member's result equals training
it alone, bit for bit. A loop over members rather than a member axis inside the
kernels: each member's encoder is one GEMM of the size the kernels are tuned
for, the loop costs E launches per op, and the kernels stay single-SAE.

Members may differ in l1_coefficient (relu/jumprelu), k (topk/batchtopk) and
seed: a sweep, as the seed paper trained its dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import SAEConfig
from .losses import LossCoefficients, l1_penalty, loss_terms
from .ops import backend_for
from .sae import SAE, encode_flat

_SHARED = ("d_in", "d_sae", "activation", "tied", "decoder_norm_l1", "normalize_decoder", "apply_b_dec_to_input",
           "dtype")


@dataclass
class EnsembleOutput:
    x_hat: Tensor  # (E, N, d_in)
    values: Tensor  # (E, N, w) each member's compact latents, padded with value 0 to the widest
    indices: Tensor  # (E, N, w) member-local latent indices
    mse: Tensor  # (E,)
    l1: Tensor | None  # (E,)
    loss: Tensor  # (E,) each member's loss; their sum is what trains the ensemble
    threshold: Tensor | None = None  # (E,) BatchTopK in training: each member's batch threshold


class SAEEnsemble(nn.Module):
    def __init__(self, members: list[SAE]):
        super().__init__()
        if not members:
            raise ValueError("SAEEnsemble needs at least one member")
        first = members[0].cfg
        for i, m in enumerate(members):
            for field in _SHARED:
                if getattr(m.cfg, field) != getattr(first, field):
                    raise ValueError(f"member {i} has {field}={getattr(m.cfg, field)!r}, member 0 has "
                                     f"{getattr(first, field)!r}: ensemble members share {_SHARED}")
        if first.activation == "jumprelu":
            raise ValueError("SAEEnsemble supports relu, topk and batchtopk members")
        if first.kind != "sae":
            raise ValueError(f"SAEEnsemble: members must be SAEs (SAEConfig.kind='sae'), got kind={first.kind!r}")
        self.cfgs = [m.cfg for m in members]
        self.n, self.d_sae, self.d_in = len(members), first.d_sae, first.d_in
        with torch.no_grad():
            self.W_dec = nn.Parameter(torch.cat([m.W_dec for m in members]))  # (E·d_sae, d_in)
            if not first.tied:
                self.W_enc = nn.Parameter(torch.cat([m.W_enc for m in members]))
            self.b_enc = nn.Parameter(torch.cat([m.b_enc for m in members]))  # (E·d_sae,)
            self.b_dec = nn.Parameter(torch.stack([m.b_dec for m in members]))  # (E, d_in)
        if first.activation == "batchtopk":
            self.register_buffer("threshold", torch.stack([m.threshold for m in members]))
        self.l1_coefficients = [m.cfg.l1_coefficient for m in members]

    def __getattr__(self, name: str):
        if name == "W_enc" and self.cfgs[0].tied:
            return self.W_dec
        return super().__getattr__(name)

    @property
    def cfg(self) -> SAEConfig:
        """The shared shape (member 0's config)."""
        return self.cfgs[0]

    def member(self, e: int) -> SAE:
        """A standalone copy of member e."""
        sae = SAE(self.cfgs[e], device="meta")
        block = slice(e * self.d_sae, (e + 1) * self.d_sae)
        tensors = {"W_dec": self.W_dec[block], "b_enc": self.b_enc[block], "b_dec": self.b_dec[e]}
        if not self.cfg.tied:
            tensors["W_enc"] = self.W_enc[block]
        if self.cfg.activation == "batchtopk":
            tensors["threshold"] = self.threshold[e]
        sae.load_tensors({k: v.detach().clone() for k, v in tensors.items()}, source=f"ensemble member {e}")
        return sae

    def forward(self, x: Tensor, l1_coefficients: list[float] | None = None) -> EnsembleOutput:
        """x (N, d_in), shared by every member. l1_coefficients: each member's (warmed-up) L1 weight,
        default their configs'."""
        if x.dim() != 2 or x.shape[1] != self.d_in or x.dtype != self.W_dec.dtype:
            raise ValueError(f"x must be (N, d_in={self.d_in}) {self.W_dec.dtype}, got {tuple(x.shape)} {x.dtype}")
        l1_coefficients = self.l1_coefficients if l1_coefficients is None else l1_coefficients
        if len(l1_coefficients) != self.n:
            raise ValueError(f"l1_coefficients must have one value per member ({self.n}), got {len(l1_coefficients)}")
        ops = backend_for(x.device)
        outs = []
        for e, cfg in enumerate(self.cfgs):
            block = slice(e * self.d_sae, (e + 1) * self.d_sae)
            W_enc, W_dec, b_enc, b_dec = self.W_enc[block], self.W_dec[block], self.b_enc[block], self.b_dec[e]
            threshold = self.threshold[e] if cfg.activation == "batchtopk" else None
            values, indices, tau = encode_flat(cfg, x, W_enc, b_enc, b_dec, threshold, self.training)
            x_hat = ops.decode(values, indices, W_dec, b_dec)  # (N, d_in)
            l1 = None
            if cfg.activation == "relu":
                l1 = l1_penalty(values, indices, W_dec if cfg.decoder_norm_l1 else None)
            terms = loss_terms(x, x_hat, LossCoefficients(l1=l1_coefficients[e]), l1=l1)
            outs.append((x_hat, values, indices, terms, tau))
        width = max(values.shape[1] for _, values, *_ in outs)

        def stack(i: int) -> Tensor:  # (E, N, width), padding value 0 at index 0
            return torch.stack([torch.nn.functional.pad(o[i], (0, width - o[i].shape[1])) for o in outs])

        l1 = torch.stack([o[3].l1 for o in outs]) if outs[0][3].l1 is not None else None
        taus = torch.stack([o[4] for o in outs]) if outs[0][4] is not None else None
        return EnsembleOutput(torch.stack([o[0] for o in outs]), stack(1), stack(2),
                              torch.stack([o[3].mse for o in outs]), l1, torch.stack([o[3].loss for o in outs]), taus)
