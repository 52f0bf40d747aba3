"""What stage 1 of the GPU check (bench/gpu_correctness.py) compares with: the dtype families and their
tolerances, the shapes (tiny ones in the dry run), float64 references of the encoders' inputs, and the
comparisons that make a row: max_abs_err, rel_err, tol_ratio, and the TopK and threshold encoders' own
conditions (no repeats, nothing better left out; counts exact up to latents within rounding of the
threshold). The tolerance model is in gpu_correctness's docstring."""

from __future__ import annotations

import contextlib
import math
import os

import torch

# family -> (dtype, tl.dot precision of the encoders)
FAMILIES = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "tf32": (torch.float32, "tf32"),
            "fp32": (torch.float32, "ieee")}
DTYPE_FAMILY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (atol before its scale, rtol): see the module docstring
TOL = {"fp32": (1e-5, 2e-5), "tf32": (2.5e-3, 2.5e-3), "bf16": (1e-5, 2 * 2**-8), "fp16": (1e-5, 2 * 2**-11)}


def shapes(dry: bool) -> dict:
    """(N, d_in, d_sae, k) per K_PAD and the small edge cases. The dry run (Triton's interpreter, where one
    fused TopK launch takes about a second a tile) keeps one tiny case per code path."""
    if dry:
        return {"topk": {64: (5, 16, 30, 3)}, "edge": [(1, 13, 20, 1)], "threshold": (5, 16, 40), "threshold_fams": 1,
                "decode": [(7, 3, 20, 30)], "segment": [(9, 3, 20, 30)], "adam": [((5, 13), True), ((300,), False)],
                "sae": (4, 16, 30, 2), "sae_bf16": (6, 16, 30, 3), "sae_bf16_activations": ("topk", "batchtopk"),
                "realistic": (16, 16, 32, 4), "past_2_31": (2, 16, 30, 2), "step": (8, 16, 30, 4)}
    return {"topk": {64: (777, 320, 5000, 64), 128: (300, 96, 1000, 100), 256: (61, 136, 3001, 200)},
            "edge": [(1, 40, 129, 1)], "threshold": (77, 72, 300), "threshold_fams": 2,
            "decode": [(19, 6, 33, 50), (40, 13, 130, 70), (1000, 64, 2048, 5000)],
            "segment": [(37, 5, 33, 23), (50, 9, 140, 300), (4096, 32, 2048, 3000)],
            "adam": [((37, 130), True), ((5000,), False), ((3, 4097), False)],
            "sae": (300, 96, 1000, 8), "sae_bf16": (1024, 256, 4096, 32),
            "sae_bf16_activations": ("topk", "relu", "jumprelu", "batchtopk"),
            "realistic": (8192, 2048, 65_536, 64), "past_2_31": (2048, 1024, 2**20, 32),
            "step": (4096, 2048, 32_768, 64)}


def compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> dict:
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - b).abs()
    if not diff.numel():
        return {"max_abs_err": 0.0, "rel_err": 0.0, "tol_ratio": 0.0, "atol": atol, "rtol": rtol}
    finite = bool(torch.isfinite(a).all())
    ratio = torch.where(diff == 0, 0.0, diff / (atol + rtol * b.abs()))  # exact zeros: 0, not 0/0
    ratio = float(ratio.max()) if finite else math.inf
    return {"max_abs_err": float(diff.max()) if finite else math.inf,
            "rel_err": float((a - b).norm() / b.norm().clamp_min(1e-300)) if finite else math.inf,
            "tol_ratio": ratio, "atol": atol, "rtol": rtol}


def worst(*results: dict) -> dict:
    """The result with the largest tol_ratio (what a row reports for several compared tensors)."""
    return max(results, key=lambda r: r["tol_ratio"])


@contextlib.contextmanager
def fp32_matmul(precision: str):
    from fastsae.kernels._common import set_fp32_matmul

    set_fp32_matmul(precision)
    try:
        yield
    finally:
        set_fp32_matmul(None)


@contextlib.contextmanager
def autotune(on: bool):
    before = os.environ.get("FASTSAE_AUTOTUNE")
    os.environ["FASTSAE_AUTOTUNE"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FASTSAE_AUTOTUNE")
        else:
            os.environ["FASTSAE_AUTOTUNE"] = before


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def on_device(ctx, *tensors):
    return [t.to(ctx.device) for t in tensors]


def encoder_inputs(ctx, n, d_in, d_sae, dtype, seed=0):
    """x (N, d_in), W (d_sae, d_in) with rows of norm ~1, b (d_sae,): pre-activations ~ N(0, 1). Drawn on the
    device (the 2^20-latent case is 2^30 numbers)."""
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, device=ctx.device).to(dtype)
    W = (torch.randn(d_sae, d_in, generator=g, device=ctx.device) / d_in**0.5).to(dtype)
    b = (0.1 * torch.randn(d_sae, generator=g, device=ctx.device)).to(dtype)
    return x, W, b


def pre64(x, W, b) -> torch.Tensor:
    """float64 x W^T + b of the inputs as given (already rounded to their dtype), computed on their device
    (a 2^20-latent W is 8 GiB in float64), returned on the CPU."""
    return (x.double() @ W.double().T + b.double()).cpu()


def tile_configs(ctx, d_in, d_sae, k_pad, dtype, precision):
    """Every tile config the autotuner may choose for this shape on this GPU (the TMA / wide-MMA candidates on an
    sm_90 one); in the interpreter its one config."""
    if ctx.dry:
        return [None]
    from fastsae.kernels._autotune import encoder_configs, is_hopper

    return encoder_configs(d_in, d_sae, k_pad, dtype, precision, is_hopper(torch.device("cuda")))


def config_label(config) -> str:
    return "autotuned" if config is None else config.label()


def atol_scale(fam: str, d_in: int) -> float:
    """An encoder's atol multiplier: fp32 sums of d_in products grow as √d_in; TF32's input rounding (with
    rows of W of norm ~1) gives about the same error whatever d_in, which TOL["tf32"] already holds."""
    return 4.0 if fam == "tf32" else 4 * d_in**0.5



def check_topk_values(values, indices, pre_relu, k, fam, scale) -> dict:
    """values/indices (N, k) against float64 relu(pre): values match, no repeats, nothing better left out."""
    atol, rtol = TOL[fam]
    atol *= scale
    values, indices = values.cpu(), indices.cpu().long()
    bad_index = bool(((indices < 0) | (indices >= pre_relu.shape[1])).any())
    if bad_index:
        return {"passed": False, "note": "index out of range", "tol_ratio": math.inf}
    picked = pre_relu.gather(1, indices)
    out = compare(values, picked, atol, rtol)
    repeats = sum(int(r.unique().numel() != k) for r in indices)
    rest = pre_relu.scatter(1, indices, -math.inf)
    slack = atol + rtol * picked.abs().amax(1)
    gap = float((rest.amax(1) - picked.amin(1) - slack).max())  # > 0: a better latent was left out
    best = torch.topk(pre_relu, k, dim=1).indices
    recall = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(best, indices, strict=True))
                   / best.numel())
    out.update(rows_with_repeats=repeats, missed_by=max(gap, 0.0), recall=recall)
    out["passed"] = out["tol_ratio"] <= 1 and repeats == 0 and gap <= 0
    return out


def check_threshold(values, indices, counts, pre, theta, fam, scale) -> dict:
    """Compact (N, S, C) lists against float64: counts exact and values right, up to latents within rounding
    of the threshold (either answer is right for those)."""
    atol, rtol = TOL[fam]
    atol *= scale
    n, d_sae = pre.shape
    th = theta.double().cpu() if theta is not None else torch.zeros(())
    active = pre > th
    near = (pre - th).abs() <= 4 * (atol + rtol * pre.abs())
    totals = counts.cpu().long().sum(1)
    count_off = int(((totals - active.sum(1)).abs() - near.sum(1)).clamp_min(0).sum())
    got = torch.zeros(n, d_sae, dtype=torch.float64)
    got.scatter_add_(1, indices.cpu().reshape(n, -1).long(), values.cpu().reshape(n, -1).double())
    out = compare(got[~near], (pre * active)[~near], atol, rtol)
    out.update(count_errors=count_off, active=int(active.sum()))
    out["passed"] = out["tol_ratio"] <= 1 and count_off == 0
    return out
