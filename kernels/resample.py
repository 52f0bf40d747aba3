"""Dead-latent resampling: rewrite the selected latents' rows everywhere in one pass.

For each dead latent i (one program each) with its new unit direction u:
    W_dec[i] = u
    W_enc[i] = encoder_scale · u          (skipped for tied SAEs: W_enc is W_dec)
    b_enc[i] = 0
    and every Adam moment of those rows (W_enc, W_dec, b_enc) = 0
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_matrix


@triton.jit
def _resample_kernel(
    # pointers
    latent_ptr, dir_ptr, w_dec_ptr, w_enc_ptr, b_enc_ptr,
    m_dec_ptr, v_dec_ptr, m_enc_ptr, v_enc_ptr, m_b_ptr, v_b_ptr,
    # sizes and scalars
    d_in, encoder_scale,
    # strides
    stride_dir, stride_w,
    # meta-parameters
    HAS_ENC: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(latent_ptr + pid).to(tl.int64)
    for d0 in range(0, d_in, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = offs_d < d_in
        u = tl.load(dir_ptr + pid * stride_dir + offs_d, mask=mask, other=0.0).to(tl.float32)
        dst = row * stride_w + offs_d
        tl.store(w_dec_ptr + dst, u.to(w_dec_ptr.dtype.element_ty), mask=mask)
        if HAS_ENC:
            tl.store(w_enc_ptr + dst, (u * encoder_scale).to(w_enc_ptr.dtype.element_ty), mask=mask)
        if HAS_STATE:
            zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
            tl.store(m_dec_ptr + dst, zero.to(m_dec_ptr.dtype.element_ty), mask=mask)
            tl.store(v_dec_ptr + dst, zero.to(v_dec_ptr.dtype.element_ty), mask=mask)
            if HAS_ENC:
                tl.store(m_enc_ptr + dst, zero.to(m_enc_ptr.dtype.element_ty), mask=mask)
                tl.store(v_enc_ptr + dst, zero.to(v_enc_ptr.dtype.element_ty), mask=mask)
    tl.store(b_enc_ptr + row, 0.0)
    if HAS_STATE:
        tl.store(m_b_ptr + row, 0.0)
        tl.store(v_b_ptr + row, 0.0)


def resample_block(d_in: int) -> int:
    """Elements per loop step: the row, up to 1024 (fastsae.kernels._variants compiles each choice)."""
    return min(1024, triton.next_power_of_2(d_in))


def resample_rows(latents: torch.Tensor, directions: torch.Tensor, W_dec: torch.Tensor, W_enc: torch.Tensor | None,
                  b_enc: torch.Tensor, encoder_scale: float, state: dict[str, torch.Tensor] | None = None) -> None:
    """latents (n,) int64, directions (n, d_in) unit rows; W_dec/W_enc (d_sae, d_in) contiguous.

    state, when the optimizer has any: {"m_dec", "v_dec", "m_enc", "v_enc", "m_b", "v_b"}
    laid out like their parameters (m_enc/v_enc absent for tied SAEs)."""
    check_matrix("directions", directions, rows=latents.shape[0], cols=W_dec.shape[1])
    for name, t in (("W_dec", W_dec), ("W_enc", W_enc)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    n = latents.shape[0]
    if n == 0:
        return
    has_enc = W_enc is not None
    dummy = b_enc
    s = state or {}
    d_in = W_dec.shape[1]
    _resample_kernel[(n,)](
        latents, directions.contiguous(), W_dec, W_enc if has_enc else dummy, b_enc,
        s.get("m_dec", dummy), s.get("v_dec", dummy), s.get("m_enc", dummy), s.get("v_enc", dummy),
        s.get("m_b", dummy), s.get("v_b", dummy),
        d_in, float(encoder_scale), directions.stride(0), W_dec.stride(0),
        HAS_ENC=has_enc, HAS_STATE=state is not None, BLOCK_D=resample_block(d_in),
    )
