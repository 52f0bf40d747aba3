"""`SAEAdam`: Adam fused with the decoder's unit-norm constraint (kernels/adam.py on CUDA).

One optimizer step does, per parameter and in one pass: Adam with bias
correction (fp32 arithmetic; fp32 or bf16 state), and for W_dec when the SAE
keeps unit-norm decoder rows, the removal of each row's gradient component
along the row before the update and the renormalisation after it. It matches
`torch.optim.Adam` plus `SAE.remove_parallel_decoder_grad_` and
`SAE.normalize_decoder_` to fp32 rounding. Off CUDA the same math runs as
PyTorch ops.
"""

from __future__ import annotations

import torch

from ..sae import SAE


class SAEAdam(torch.optim.Optimizer):
    def __init__(self, sae: SAE, lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 state_dtype: torch.dtype = torch.float32, use_kernel: bool | None = None):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype}")
        decoder = [sae.W_dec]
        others = [p for p in sae.parameters() if p.requires_grad and p is not sae.W_dec]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps)
        super().__init__([{"params": decoder, "unit_rows": sae.cfg.normalize_decoder},
                          {"params": others, "unit_rows": False}], defaults)
        self.state_dtype = state_dtype
        self.use_kernel = use_kernel

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
                step = int(state["step"].item())
                kernel = p.is_cuda if self.use_kernel is None else self.use_kernel
                update = _adam_kernel if kernel else _adam_torch
                update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=group["lr"],
                       beta1=beta1, beta2=beta2, eps=group["eps"], rows=group["unit_rows"])
        return loss


def _adam_kernel(p, grad, m, v, **kw) -> None:
    from ..kernels.adam import adam_step

    adam_step(p.data, grad.contiguous(), m, v, **kw)


def _adam_torch(p, grad, m, v, *, step, lr, beta1, beta2, eps, rows) -> None:
    """The same arithmetic as the kernel, as in-place PyTorch ops (torch.optim.Adam's own order)."""
    w = p.data
    g = grad.float() if grad.dtype != torch.float32 else grad
    if rows:
        g = g - (g * w.float()).sum(1, keepdim=True) * w.float()
    fp32_state = m.dtype == torch.float32
    m32 = m if fp32_state else m.float()
    v32 = v if fp32_state else v.float()
    m32.lerp_(g, 1.0 - beta1)
    v32.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    denom = (v32.sqrt() / bc2**0.5).add_(eps)
    if w.dtype == torch.float32:
        w.addcdiv_(m32, denom, value=-lr / bc1)
    else:
        w.copy_(w.float().addcdiv_(m32, denom, value=-lr / bc1))
    if not fp32_state:
        m.copy_(m32)
        v.copy_(v32)
    if rows:
        w.div_(w.float().norm(dim=1, keepdim=True).clamp_min(1e-30).to(w.dtype))
