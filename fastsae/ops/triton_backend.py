"""The Triton backend: fused kernels from `fastsae.kernels`, default on CUDA.

- TopK: the fused encoder filters each tile by a per-row threshold and keeps
  short candidate lists; the (N, d_sae) pre-activations never exist. k above
  kernels.encoder_topk.MAX_K (256) falls back to the dense torch path.
- ReLU / JumpReLU: the fused encoder writes active latents into a compact
  buffer of `capacity` slots per (row, slice). If a row has more, the exact
  answer comes from a second pass with the capacity the first pass measured.
  The capacity adapts to the last batch (1.25 x its largest count).
- BatchTopK: per-row top-c candidates from the TopK kernel, then the batch's
  top N·k among them. Exact: if any row had all c candidates selected, c is
  doubled and the batch redone.
- Decode and every backward: gathers over active rows and a latent-sorted
  segment reduction; deterministic.
- Matryoshka: one kernel gives x_hat and every prefix's loss (kernels/prefix_decode.py);
  its backward is the torch path's (ops/matryoshka.py), on the same CUDA tensors.
- fp32 SAEs: the encoder GEMMs run in TF32 on the tensor cores (about 1e-3
  relative error on a pre-activation); `set_fp32_matmul("ieee")` or
  FASTSAE_FP32_MATMUL=ieee asks for exact fp32. 16-bit SAEs are unaffected.
- Tiles: each encoder's tile config is autotuned once per shape
  (kernels/_autotune.py); every candidate is compiled for sm_80 and sm_90 by
  tests/ops/test_compile.py.

`STATS` counts which path each call took, for the trainer to log.
"""

from __future__ import annotations

from collections import Counter

import torch
import triton
from torch import Tensor

from ..kernels import adam as _adam
from ..kernels import encoder_threshold as _thr
from ..kernels import encoder_topk as _topk
from ..kernels import prefix_decode as _prefix
from ..kernels import resample as _resample
from ..kernels import segment_reduce as _seg
from ..kernels import sparse_decode as _dec
from ..kernels._common import interpreting, next_pow2, set_fp32_matmul  # noqa: F401 (re-exported)
from . import jumprelu, matryoshka, torch_backend
from ._autograd import SparseEncode, SparsePrims

STATS: Counter = Counter()
# Capacity per (row, slice) of the threshold encoder's compact buffer, per d_sae.
_capacity_hint: dict[int, int] = {}
INITIAL_CAPACITY = 128


def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not interpreting():
            raise RuntimeError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for tests); "
                               f"got a tensor on {t.device}. Use set_backend('torch') on CPU.")


def _segment_sum(indices: Tensor, coef: Tensor, y: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    return _seg.segment_reduce(indices, coef, y, d_sae, out_dtype=torch.float32, with_sum=True)


PRIMS = SparsePrims(
    gather_rows=lambda coef, indices, W: _dec.sparse_decode(coef, indices, W),
    segment_sum=_segment_sum,
)


# ---- TopK -------------------------------------------------------------------------------------------


def _select_topk(k: int):
    def select(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor]:
        STATS["topk_fused"] += 1
        return _topk.encoder_topk(x, W_enc, b_enc, k)

    return select


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _check_device(x, W_enc, b_enc)
    if k > _topk.MAX_K:
        STATS["topk_dense_fallback"] += 1
        return torch_backend.encode_topk(x, W_enc, b_enc, k)
    return SparseEncode.apply(x, W_enc, b_enc, _select_topk(k), PRIMS)


# ---- ReLU / JumpReLU --------------------------------------------------------------------------------


def _compact(values: Tensor, indices: Tensor, counts: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(N, S, C) slot lists -> (N, w) compact form, w = the largest row total."""
    N, splits, cap = values.shape
    width = max(1, int(counts.sum(1).max()))
    if splits == 1:
        return values[:, 0, :width].to(dtype), indices[:, 0, :width].long()
    values, slot = torch.topk(values.view(N, splits * cap), width, dim=1)  # active (> 0) slots first
    return values.to(dtype), indices.view(N, -1).gather(1, slot).long()


def _select_threshold(threshold: Tensor | None):
    def select(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor]:
        d_sae = W_enc.shape[0]
        capacity = min(_capacity_hint.get(d_sae, INITIAL_CAPACITY), d_sae)
        values, indices, counts = _thr.encoder_threshold(x, W_enc, b_enc, threshold, capacity)
        needed = int(counts.max())
        if needed > capacity:  # some row overflowed: redo it exactly, with the measured capacity
            STATS["threshold_second_pass"] += 1
            values, indices, counts = _thr.encoder_threshold(x, W_enc, b_enc, threshold, needed)
        else:
            STATS["threshold_one_pass"] += 1
        _capacity_hint[d_sae] = max(16, triton.cdiv(needed * 5 // 4, 16) * 16)
        return _compact(values, indices, counts, x.dtype)

    return select


def encode_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_device(x, W_enc, b_enc)
    theta = None if threshold is None else threshold.detach()
    return SparseEncode.apply(x, W_enc, b_enc, _select_threshold(theta), PRIMS)


def encode_jumprelu(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU with θ's straight-through gradient (ops/jumprelu.py): the fused threshold encoder with its
    threshold lowered by ε/2 selects the active latents and the halo. Its compaction ranks slots by value
    with padding 0, so it needs θ − ε/2 > 0 everywhere; else the torch path (dense pre-activations), exact too.
    θ's gradient itself is the torch ops of ops/jumprelu.py on the (N, w) slots, not a kernel."""
    _check_device(x, W_enc, b_enc)
    theta = threshold.detach()
    low = (theta.float() - bandwidth / 2).contiguous()
    if not bool((low > 0).all()):
        STATS["jumprelu_dense_fallback"] += 1
        return torch_backend.encode_jumprelu(x, W_enc, b_enc, threshold, bandwidth)
    fused = _select_threshold(low)

    def select(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return jumprelu.split_window(*fused(x, W_enc, b_enc), theta, bandwidth)  # padding 0 <= low: no window

    values, indices, window = SparseEncode.apply(x, W_enc, b_enc, select, PRIMS)
    return jumprelu.attach_threshold(values, indices, window, threshold, bandwidth), indices, window


# ---- BatchTopK --------------------------------------------------------------------------------------


class _TooWide(Exception):
    """The candidates BatchTopK needs exceed the TopK kernel's register budget."""


def encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    _check_device(x, W_enc, b_enc)
    N, d_sae = x.shape[0], W_enc.shape[0]

    def select(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cap = min(d_sae, next_pow2(2 * k))
        while True:
            if cap > _topk.MAX_K:
                raise _TooWide
            cand_val, cand_idx = _topk.encoder_topk_candidates(x, W_enc, b_enc, cap)
            row_val, slot = torch.topk(cand_val, cap, dim=1)  # each row's top cap, sorted
            tau = torch.topk(row_val.reshape(-1), N * k).values[-1]
            last = row_val[:, -1]
            if cap == d_sae or not bool(((last >= tau) & (last > 0)).any()):
                break  # no row could have more selected latents than it offered
            STATS["batchtopk_wider_candidates"] += 1
            cap = min(d_sae, 2 * cap)
        STATS["batchtopk_fused"] += 1
        active = (row_val >= tau) & (row_val > 0)
        width = max(1, int(active.sum(1).max()))
        values = torch.where(active, row_val, 0.0)[:, :width]  # sorted: the active ones come first
        return values.to(x.dtype), cand_idx.gather(1, slot[:, :width]).long(), tau.float()

    try:
        return SparseEncode.apply(x, W_enc, b_enc, select, PRIMS)
    except _TooWide:
        STATS["batchtopk_dense_fallback"] += 1
        return torch_backend.encode_batchtopk(x, W_enc, b_enc, k)


# ---- decode -----------------------------------------------------------------------------------------


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return _dec.sparse_decode(values, indices, W_dec, b_dec)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad_values, grad_W = decode_grads(grad_out, values, indices, W_dec, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[2])
        grad_b = grad_out.float().sum(0).to(W_dec.dtype) if ctx.needs_input_grad[3] else None
        return grad_values, None, grad_W, grad_b


def decode_grads(grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, need_values: bool,
                 need_W: bool) -> tuple[Tensor | None, Tensor | None]:
    """decode's backward without its bias: grad_values (N, w), grad_W (d_sae, d_in), None where not asked for."""
    grad_values = grad_W = None
    if need_values:
        grad_values = _dec.sparse_value_grad(grad_out, indices, W_dec).to(values.dtype)
    if need_W:
        grad_W = _seg.segment_reduce(indices, values, grad_out, W_dec.shape[0], out_dtype=W_dec.dtype)
    return grad_values, grad_W


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    _check_device(values, W_dec)
    return _SparseDecode.apply(values, indices, W_dec, b_dec)


def matryoshka_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                      widths: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """x_hat (N, d_in) and each nested prefix's mse (P,) fp32, as ops/matryoshka.py's matryoshka_decode; float64
    inputs take that torch path (the kernel accumulates in fp32, the contract there is float64)."""
    _check_device(values, W_dec, x)
    widths = matryoshka.check_widths(widths, W_dec.shape[0])
    if torch.float64 in (values.dtype, W_dec.dtype, x.dtype):
        STATS["matryoshka_float64_torch"] += 1
        return matryoshka.matryoshka_decode(values, indices, W_dec, b_dec, x, widths)
    if x.shape != (values.shape[0], W_dec.shape[1]):
        raise ValueError(f"matryoshka_decode: x must be (N, d_in) = {(values.shape[0], W_dec.shape[1])}, "
                         f"got {tuple(x.shape)}")
    STATS["matryoshka_fused"] += 1
    # the kernel's forward, ops/matryoshka.py's backward (torch ops on the CUDA tensors)
    return matryoshka._MatryoshkaDecode.apply(values, indices, W_dec, b_dec, x, widths, _prefix.prefix_decode)


# ---- the optimizer step and resampling -------------------------------------------------------------


def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, lr: float,
              beta1: float, beta2: float, eps: float, rows: bool = False) -> None:
    _check_device(param, grad, exp_avg, exp_avg_sq)
    _adam.adam_step(param, grad.contiguous(), exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, rows=rows)


def resample_rows(latents: Tensor, directions: Tensor, W_dec: Tensor, W_enc: Tensor | None, b_enc: Tensor,
                  encoder_scale: float, state: dict[str, Tensor] | None = None) -> None:
    _check_device(latents, directions, W_dec, b_enc)
    _resample.resample_rows(latents, directions, W_dec, W_enc, b_enc, encoder_scale, state)
