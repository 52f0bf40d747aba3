"""`SAEAdam`: Adam fused with the decoder's unit-norm constraint (`fastsae.ops`' adam_step).

One optimizer step does, per parameter and in one pass: Adam with bias
correction (fp32 arithmetic; fp32 or bf16 state), and for W_dec when the SAE
keeps unit-norm decoder rows, the removal of each row's gradient component
along the row before the update and the renormalisation after it. It matches
`torch.optim.Adam` plus `SAE.remove_parallel_decoder_grad_` and
`SAE.normalize_decoder_` to fp32 rounding. The step goes through the backend
in force (`fastsae.use_backend`): the Triton kernel on CUDA, PyTorch ops
elsewhere, the float64 reference in tests. On CPU with the torch backend, fp32
parameters, gradients and state, the moments are updated by torch's own fused
CPU Adam (`torch._fused_adam_`, one vectorised pass, what
`torch.optim.Adam(fused=True)` runs) instead of the backend's ten-odd
whole-tensor passes (85 against 14 ms a step at d_sae 16384, d_in 768 on an
Intel Xeon, issue 26), and the decoder goes through it in blocks of ROW_CHUNK
rows, each projected, updated and renormalised while it is in cache.
`build_optimizer` picks SAEAdam or torch's Adam from an `OptimizerConfig`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import backend_for, torch_backend
from ..sae import SAE
from .train_config import OptimizerConfig

# decoder rows per block of the CPU step: p, grad, both moments and the projected gradient of 512 rows at
# d_in 768 are 7.5 MB, so the row projection, the Adam update and the renormalisation of a block meet it in
# cache instead of making three passes over the whole (d_sae, d_in) matrix in memory
ROW_CHUNK = 512
# torch's fused CPU Adam runs whole SIMD vectors (up to 16 floats; its threads split at 16-float boundaries)
# and a scalar tail whose rounding differs (no FMA): an element's result would depend on where it sits, and an
# ensemble member (rows inside a stacked tensor) would no longer equal its solo run. The tail goes through the
# vector path too, from a 16-float zero-padded copy.
SIMD_FLOATS = 16


class SAEAdam(torch.optim.Optimizer):
    def __init__(self, sae: SAE, lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 state_dtype: torch.dtype = torch.float32):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype}")
        decoder = [sae.W_dec]
        others = [p for p in sae.parameters() if p.requires_grad and p is not sae.W_dec]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps)
        super().__init__([{"params": decoder, "unit_rows": sae.cfg.normalize_decoder},
                          {"params": others, "unit_rows": False}], defaults)
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts floating state to the parameter's dtype; keep bf16 moments bf16.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
                state["step"] += 1
                if _fused_cpu(p, state):
                    _cpu_adam_step(p, state, group)
                    continue
                step = int(state["step"].item())
                backend_for(p.device).adam_step(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], step=step,
                                                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                                rows=group["unit_rows"])
        return loss


def _fused_cpu(p: Tensor, state: dict) -> bool:
    """Whether p's step can be torch's fused CPU Adam: the torch backend on CPU, fp32 and contiguous
    everywhere. bf16 moments (or parameters) keep the backend's step, which upcasts them to fp32 arithmetic
    and rounds once on store; the fused kernel wants the state in the parameter's dtype."""
    tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
    return (p.device.type == "cpu" and backend_for(p.device) is torch_backend and not p.grad.is_sparse
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors))


def _cpu_adam_step(p: Tensor, state: dict, group: dict) -> None:
    """One Adam step of p by torch._fused_adam_ (state["step"] already counted); with group["unit_rows"], per
    block of rows: the gradient's component along each row removed first, the rows renormalised after."""
    beta1, beta2 = group["betas"]
    kw = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], amsgrad=False,
              maximize=False)
    if not group["unit_rows"]:
        _fused_adam(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], kw)
        return
    W, G, M, V = (t.view(-1, p.shape[-1]) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
    for start in range(0, W.shape[0], ROW_CHUNK):
        w, g, m, v = (t[start:start + ROW_CHUNK] for t in (W, G, M, V))
        g = torch.addcmul(g, (g * w).sum(1, keepdim=True), w, value=-1.0)  # g − <g, w> w, a new tensor: p.grad stays
        _fused_adam(w, g, m, v, state["step"], kw)
        w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(1e-30))


def _fused_adam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, kw: dict) -> None:
    """torch._fused_adam_ on contiguous p, g, m, v with every element in whole SIMD vectors (SIMD_FLOATS)."""
    flat = [t.view(-1) for t in (p, g, m, v)]
    n = flat[0].numel()
    body = n - n % SIMD_FLOATS
    if body:
        torch._fused_adam_(*([t[:body]] for t in flat), [], [step], **kw)
    if body < n:  # zero gradient and moments in the padding: a zero update there, nothing non-finite
        pad = torch.zeros(4, SIMD_FLOATS, dtype=p.dtype)
        for buffer, t in zip(pad, flat, strict=True):
            buffer[:n - body] = t[body:]
        torch._fused_adam_(*([buffer] for buffer in pad), [], [step], **kw)
        for i in (0, 2, 3):  # p, m, v (not the gradient)
            flat[i][body:] = pad[i, :n - body]


def build_optimizer(sae: SAE, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer cfg asks for: SAEAdam (the fused step, with the decoder constraint inside it) or
    torch.optim.Adam (the constraint then being the trainer's two passes around its step, `Trainer.fused`)."""
    fused = cfg.kind == "fused" or (cfg.kind == "auto" and sae.device.type == "cuda") or cfg.state_dtype != "float32"
    if fused:
        return SAEAdam(sae, lr=cfg.lr, betas=cfg.betas, state_dtype=getattr(torch, cfg.state_dtype))
    # On CPU, torch's own fused Adam: one pass over each parameter, ~10x faster than its default per-tensor
    # loop at d_sae 16384, d_in 768 on 2 cores (36 ms against 340 ms; bench/cpu_step.py), same arithmetic.
    return torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                            fused=True if sae.device.type == "cpu" else None)
