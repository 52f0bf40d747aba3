"""`SAEEnsemble`: E SAEs of one shape trained on the same batches with one set of kernels per step.

The members' weights are stacked along the latents, (E·d_sae, d_in), so the
ensemble is one wide SAE whose row n of member e may only use member e's block
of latents. Per step: one batched encoder GEMM (baddbmm), one batched selection,
one decode and one sparse backward over all members (global latent indices),
and one optimizer pass over the stacked parameters. On CPU each member's result
equals training it alone, bit for bit.

Members may differ in l1_coefficient (relu/jumprelu), k (topk/batchtopk) and
seed: a sweep, as the seed paper trained its dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import SAEConfig
from .ops import torch_backend
from .ops._autograd import SparseEncode
from .sae import BATCHTOPK_THRESHOLD_EMA, SAE

_SHARED = ("d_in", "d_sae", "activation", "tied", "decoder_norm_l1", "normalize_decoder", "apply_b_dec_to_input",
           "dtype")


@dataclass
class EnsembleOutput:
    x_hat: Tensor  # (E, N, d_in)
    values: Tensor  # (E, N, w)
    indices: Tensor  # (E, N, w) member-local latent indices
    mse: Tensor  # (E,)
    l1: Tensor | None  # (E,)
    loss: Tensor  # (E,) each member's loss; their sum is what trains the ensemble


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
        self.register_buffer("k", torch.tensor([m.cfg.k or 0 for m in members]))
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

    def forward(self, x: Tensor) -> EnsembleOutput:
        """x (N, d_in), shared by every member."""
        if x.dim() != 2 or x.shape[1] != self.d_in or x.dtype != self.W_dec.dtype:
            raise ValueError(f"x must be (N, d_in={self.d_in}) {self.W_dec.dtype}, got {tuple(x.shape)} {x.dtype}")
        E, N, S = self.n, x.shape[0], self.d_sae
        x_c = x.unsqueeze(0) - self.b_dec[:, None] if self.cfg.apply_b_dec_to_input else x.expand(E, N, self.d_in)
        taus: list[Tensor] = []  # BatchTopK: each member's batch threshold, filled by the selection
        values, indices = SparseEncode.apply(x_c.reshape(E * N, self.d_in), self.W_enc, self.b_enc,
                                             self._select(E, N, S, taus), torch_backend.PRIMS)
        if taus and self.training:
            self._record_thresholds(taus[0])
        x_hat = torch_backend.decode_rows(values, indices, self.W_dec)  # (E·N, d_in)
        x_hat = x_hat.view(E, N, self.d_in) + self.b_dec[:, None]
        acc = torch.promote_types(x.dtype, torch.float32)
        mse = (x_hat.to(acc) - x.to(acc)).pow(2).sum(-1).mean(-1)  # (E,)
        l1 = None
        loss = mse
        if self.cfg.activation == "relu":
            z = values.to(acc)
            if self.cfg.decoder_norm_l1:
                z = z * self.W_dec.to(acc).norm(dim=1)[indices]
            l1 = z.sum(-1).view(E, N).mean(-1)
            loss = mse + torch.tensor(self.l1_coefficients, dtype=acc, device=x.device) * l1
        local = indices.view(E, N, -1) - (torch.arange(E, device=x.device) * S)[:, None, None]
        return EnsembleOutput(x_hat, values.view(E, N, -1), local.clamp_min(0), mse, l1, loss)

    @torch.no_grad()
    def _record_thresholds(self, taus: Tensor) -> None:
        """The inference threshold of each BatchTopK member, updated as SAE does it."""
        for e, tau in enumerate(taus.float()):
            if self.threshold[e] == 0:
                self.threshold[e] = tau
            else:
                self.threshold[e] = self.threshold[e].lerp(tau, 1 - BATCHTOPK_THRESHOLD_EMA)

    def _select(self, E: int, N: int, S: int, taus: list[Tensor]):
        activation, k = self.cfg.activation, self.k
        offsets = (torch.arange(E, device=k.device) * S)[:, None, None]  # member e's block starts at e·S

        def select(x: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            # One batched GEMM for every member: (E, N, d_in) x (E, d_in, S) + b -> (E, N, S).
            pre = torch.baddbmm(b.view(E, 1, S), x.view(E, N, -1), W.view(E, S, -1).transpose(1, 2))
            if activation == "topk":
                values, local = torch.topk(pre, int(k.max()), dim=-1)  # sorted: member e keeps its first k_e
                keep = torch.arange(values.shape[-1], device=pre.device) < k[:, None, None]
                values = values.clamp_min_(0) * keep
            else:
                if activation == "relu":
                    active = pre > 0
                else:  # batchtopk: each member's own batch top N·k_e
                    pre = pre.relu_()
                    tau = torch.stack([torch.topk(pre[e].reshape(-1), int(k[e]) * N).values[-1] for e in range(E)])
                    taus.append(tau)
                    active = (pre >= tau[:, None, None]) & (pre > 0)
                values, local = torch_backend._select_active(pre.view(E * N, S), active.view(E * N, S))
                values, local = values.view(E, N, -1), local.view(E, N, -1)
            return values.reshape(E * N, -1), (local + offsets).reshape(E * N, -1)

        return select
