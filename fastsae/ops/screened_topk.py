"""TopK's selection on CPUs whose bf16 GEMM outruns their fp32 one: screen in bf16, rescore in fp32, certify.

The fp32 encoder GEMM is most of a CPU training step. Where the CPU multiplies bf16 in hardware (AMX), a bf16
GEMM of the same shape is several times faster: 42 against 203 ms at 2048 x 768 x 16384 on the Intel Xeon (2
cores), and the whole selection 138 against 249 ms (the "encoder GEMM" and "TopK selection" rows of
bench/results/training/cpu-parts-screen-2026-12-06/cpu-parts-2026-12-06.md). It stays that of the fp32 values:

    approx[n, j] = bf16 GEMM of [x_n, 1] and [w_j, b_j] (fp32 accumulation, bf16 output)
    (x_n . w_j + b_j) - approx[n, j] <= slack_n whenever approx[n, j] <= A     (rounding, `_slack`)

The m = k + MARGIN largest approx of a row are its candidates; their fp32 values are rescored exactly (a dot
each, `rows_dot`); T = the k-th largest of those. A non-candidate's approx is at most A, the least candidate's,
so its value is at most A + slack_n; where that is below T the row's top k lie among its candidates,
and are theirs. A row that fails (ties, NaN, a flat row) takes the fp32 GEMM, alone.
Whether screening pays is measured on the machine, once per shape, and cached as cpu_gemm's verdicts are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_gemm
from .row_select import rows_dot, topk_rows

U = 2.0 ** -8  # bf16's unit roundoff (8 significant bits): |bf16(v) - v| <= U |v|
MARGIN = 64  # candidates beyond k per row: too few and rows fail the certificate (then the fp32 GEMM runs for them)


def screened_topk(x: Tensor, W: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(F.linear(x, W, b), k, dim=1) for fp32 x (N, d_in), W (d_sae, d_in), b (d_sae,): the same
    entries (ties aside), values rescored in fp32, without an fp32 (N, d_sae) GEMM except for rows it cannot
    certify."""
    m = min(W.shape[0], k + MARGIN)
    xb = _with_ones(x)
    approx = F.linear(xb, _with_bias(W, b))  # (N, d_sae) bf16, bias included
    screen, candidates = topk_rows(approx, m)  # descending: screen[:, -1] is A
    exact = rows_dot(x, candidates, W).add_(b[candidates])  # (N, m) fp32
    values, at = torch.topk(exact, k, dim=1)
    indices = candidates.gather(1, at)
    A, T = screen[:, -1].float(), values[:, -1]
    certified = A + _slack(x, xb, W, b, A) < T - 2.0 ** -22 * T.abs()  # T's own rounding (the bias added); NaN: False
    if m < W.shape[0] and not bool(certified.all()):
        rows = (~certified).nonzero().squeeze(1)
        values[rows], indices[rows] = torch.topk(F.linear(x[rows], W, b), k, dim=1)
    return values, indices


def _slack(x: Tensor, xb: Tensor, W: Tensor, b: Tensor, A: Tensor) -> Tensor:
    """(N,) a bound on (x_n . w_j + b_j) - approx[n, j] for every j, whatever approx[n, j] <= A_n.

    x.w - bf16(x).bf16(w) = (x - bf16(x)).w + bf16(x).(w - bf16(w)): at most |x - bf16(x)| max|w| (measured
    for x, which is small) + |bf16(x)| U max|w|; the bias's rounding, measured; fp32 accumulation over d_in + 1
    terms, gamma (|bf16(x)| max|bf16(w)| + max|b|); the output's rounding to bf16, 2U |A| (what approx <= A can
    hide); and the rescore's dot products, gamma |x| max|w| again (its bias addition: the caller's margin on T).
    Cauchy-Schwarz keeps each a bound, not an estimate; products of bf16 are exact in fp32, and 1e-30 covers
    denormals flushed to zero."""
    x_low = xb[:, :-1].float()
    w_max = torch.linalg.vector_norm(W, dim=1).max()
    x_norm = torch.linalg.vector_norm(x_low, dim=1)
    gamma = 2 * (x.shape[1] + 1) * 2.0 ** -24 * (1 + U)
    b_err = (b - b.to(torch.bfloat16).float()).abs().max()
    return (torch.linalg.vector_norm(x - x_low, dim=1) * w_max + x_norm * w_max * (U + gamma) * (1 + U) + b_err
            + gamma * b.abs().max() + 2 * U * A.abs() + gamma * torch.linalg.vector_norm(x, dim=1) * w_max + 1e-30)


def _with_ones(x: Tensor) -> Tensor:
    return _with_column(x, 1.0)


def _with_bias(W: Tensor, b: Tensor) -> Tensor:
    return _with_column(W, b)


def _with_column(t: Tensor, last: Tensor | float) -> Tensor:
    """[t, last] in bf16, (r, c) -> (r, c + 1): the GEMM's extra inner index carries the bias."""
    out = torch.empty(t.shape[0], t.shape[1] + 1, dtype=torch.bfloat16)
    out[:, :-1] = t
    out[:, -1] = last
    return out


def pays(x: Tensor, W: Tensor, b: Tensor, k: int) -> bool:
    """Whether screened_topk is faster than the fp32 GEMM and top-k on this machine at this shape: for fp32 CPU
    tensors with at least 8 latents per candidate, measured once per key (cpu_gemm's cache) on the call's own
    tensors."""
    if not (x.device.type == W.device.type == "cpu" and x.dtype == W.dtype == b.dtype == torch.float32
            and x.dim() == 2 and W.shape[0] >= 8 * (k + MARGIN)) or torch.compiler.is_compiling():
        return False
    choice = cpu_gemm.forced_screen()
    if choice != "auto":
        return choice == "on"
    return cpu_gemm.measured("screen", x, W, {
        "on": lambda: screened_topk(x, W, b, k),
        "off": lambda: topk_rows(cpu_gemm.linear(x, W, b), k)}) == "on"
