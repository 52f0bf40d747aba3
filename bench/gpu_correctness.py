"""Stage 1 of bench/gpu_check.sh: every compiled kernel, in every dtype, against its float64 reference.

The interpreter (the CPU test suite) checks the kernels' logic; only a GPU checks the compiled code:
tensor-core tiles, warpgroup MMA, the register-level sort of the TopK epilogue, int64 offsets past 2^31.
Each group below runs in a process of its own (bench/gpu_stages.py starts them side by side): a kernel
that faults poisons its CUDA context and costs only its own group, and the groups' cold compiles (the
fused encoders take 5-30 s each, kernels/_autotune.py) overlap on the machine's cores.

Shapes are odd (no block multiples) and small; the `realistic` group checks the target shape and an
N·d_sae past 2^31. Every candidate tile config of the autotuner is checked for the encoders, pinned,
since the autotuner may pick any of them on some shape.

Tolerances model what the kernel does: products and sums in fp32 (atol, times a per-check scale of about
the square root of the terms summed) and one rounding to the output dtype on store (rtol: twice its unit
roundoff); TF32 first rounds the GEMM's inputs to 10 bits of mantissa (about 1e-3 on a pre-activation).
A row records max_abs_err, rel_err (‖a − b‖ / ‖b‖), tol_ratio = max |a − b| / (atol + rtol·|b|) and
passed (tol_ratio ≤ 1 and the check's own conditions): a ratio near 1 on a pass is worth a look.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os

import torch

# family -> (dtype, tl.dot precision of the encoders)
FAMILIES = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "tf32": (torch.float32, "tf32"),
            "fp32": (torch.float32, "ieee")}
DTYPE_FAMILY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (atol before its scale, rtol): see the module docstring
TOL = {"fp32": (1e-5, 2e-5), "tf32": (2.5e-3, 2.5e-3), "bf16": (1e-5, 2 * 2**-8), "fp16": (1e-5, 2 * 2**-11)}

# Group name -> what it checks, in priority order (the order the driver starts them in). A group is one
# process on a GPU, and holds at most about four cold encoder compiles, so that a dozen of them side by
# side end within stage 1's budget.
GROUPS = {
    "topk-bf16": "fused TopK encoder, bf16, K_PAD 64, every tile config",
    "realistic": "TopK at the target shape (and its memory), and past 2^31 elements",
    "step-bf16": "a bf16 TopK SAE forward + backward of tests/ops/test_gpu.py's shape against float64",
    "sae-bf16": "a whole bf16 SAE forward + backward through the Triton backend against float64",
    "decode": "sparse decode and its value gradient (fp32, bf16, fp16)",
    "segment": "the segment reduction of the weight gradients (fp32, bf16, fp16), and its determinism",
    "adam-resample": "fused Adam (unit rows and elementwise, fp32/bf16 state) and resampling",
    "topk-bf16-wide": "fused TopK encoder, bf16, K_PAD 128 and 256, every tile config",
    "sae-fp32": "a whole fp32 SAE forward + backward (exact fp32) against float64, every activation",
    "threshold-bf16": "fused ReLU/JumpReLU encoder, bf16, every tile config",
    "topk-edges": "fused TopK encoder at one row and k 1, every dtype",
    "topk-fp16": "fused TopK encoder, fp16, K_PAD 64, every tile config",
    "topk-fp16-wide": "fused TopK encoder, fp16, K_PAD 128 and 256, every tile config",
    "topk-tf32": "fused TopK encoder, fp32 in TF32, every K_PAD and tile config",
    "topk-fp32": "fused TopK encoder, exact fp32, every K_PAD and tile config",
    "threshold-fp16": "fused ReLU/JumpReLU encoder, fp16, every tile config",
    "threshold-fp32": "fused ReLU/JumpReLU encoder, fp32 (TF32 and exact), every tile config",
}


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


# ---- comparison ---------------------------------------------------------------------------------------


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


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(ctx, *tensors):
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


def _configs(ctx, d_in, d_sae, k_pad, dtype, precision):
    """Every tile config the autotuner may choose for this shape; in the interpreter its one config."""
    if ctx.dry:
        return [None]
    from fastsae.kernels._autotune import encoder_configs

    return encoder_configs(d_in, d_sae, k_pad, dtype, precision)


def _label(config) -> str:
    return "autotuned" if config is None else config.label()


# ---- the checks ---------------------------------------------------------------------------------------


def _scale(fam: str, d_in: int) -> float:
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


def topk_group(rec, ctx, fams: tuple[str, ...], k_pads: tuple[int, ...], edges: bool = False) -> None:
    """Every tile config at each K_PAD's shape; or (edges) the edge shapes with each family's first config."""
    from fastsae.kernels._autotune import topk_k_pad
    from fastsae.kernels.encoder_topk import encoder_topk

    s = shapes(ctx.dry)
    for fam in fams:
        dtype, precision = FAMILIES[fam]
        work = []
        for shape in s["edge"] if edges else [s["topk"][kp] for kp in k_pads if kp in s["topk"]]:
            n, d_in, d_sae, k = shape
            configs = _configs(ctx, d_in, d_sae, topk_k_pad(k), dtype, precision)
            work += [(shape, c) for c in (configs[:1] if edges else configs)]
        for (n, d_in, d_sae, k), config in work:
            name = dict(kernel="encoder_topk", dtype=fam, shape=f"N {n}, d_in {d_in}, d_sae {d_sae}, k {k}",
                        config=_label(config))
            with rec.check(**name) as row:
                x, W, b = encoder_inputs(ctx, n, d_in, d_sae, dtype, seed=n + k)
                with fp32_matmul(precision):
                    values, indices = encoder_topk(x, W, b, k, config=config)
                row.update(check_topk_values(values, indices, pre64(x, W, b).relu(), k, fam, _scale(fam, d_in)))


def threshold_group(rec, ctx, fams: tuple[str, ...]) -> None:
    from fastsae.kernels.encoder_threshold import encoder_threshold

    n, d_in, d_sae = shapes(ctx.dry)["threshold"]
    for fam in fams[:shapes(ctx.dry)["threshold_fams"]]:
        dtype, precision = FAMILIES[fam]
        for config in _configs(ctx, d_in, d_sae, None, dtype, precision):
            for jump in (False, True):
                name = dict(kernel="encoder_threshold", dtype=fam, shape=f"N {n}, d_in {d_in}, d_sae {d_sae}",
                            config=_label(config), variant="jumprelu" if jump else "relu")
                with rec.check(**name) as row:
                    x, W, b = encoder_inputs(ctx, n, d_in, d_sae, dtype, seed=3)
                    theta = (0.2 * torch.rand(d_sae, generator=_gen(4))).to(ctx.device) if jump else None
                    with fp32_matmul(precision):
                        values, indices, counts = encoder_threshold(x, W, b, theta, d_sae, config=config)
                    row.update(check_threshold(values, indices, counts, pre64(x, W, b), theta, fam, _scale(fam, d_in)))


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


def decode_group(rec, ctx) -> None:
    from fastsae.kernels.sparse_decode import sparse_decode, sparse_value_grad
    from fastsae.ops import reference

    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        fam = DTYPE_FAMILY[dtype]
        atol, rtol = TOL[fam]
        for n, width, d_in, d_sae in shapes(ctx.dry)["decode"]:
            shape = f"N {n}, width {width}, d_in {d_in}, d_sae {d_sae}"
            g = _gen(n)
            W, bias = torch.randn(d_sae, d_in, generator=g).to(dtype), torch.randn(d_in, generator=g).to(dtype)
            values = torch.rand(n, width, generator=g).to(dtype)
            values[:, -1] = 0  # a padding slot
            indices = torch.randint(0, d_sae, (n, width), generator=g)
            expected = reference.decode(values.double(), indices, W.double(), bias.double())
            with rec.check(kernel="sparse_decode", dtype=fam, shape=shape, config="bias") as row:
                got = sparse_decode(*_to(ctx, values, indices, W, bias))
                row.update(compare(got, expected, 4 * atol * width**0.5, rtol))
                row["passed"] = row["tol_ratio"] <= 1 and got.dtype == dtype
            with rec.check(kernel="sparse_decode", dtype=fam, shape=shape, config="no bias, fp32 out") as row:
                got = sparse_decode(*_to(ctx, values, indices, W), out_dtype=torch.float32)
                row.update(compare(got, expected - bias.double(), 4 * TOL["fp32"][0] * width**0.5, TOL["fp32"][1]))
            grad = torch.randn(n, d_in, generator=g).to(dtype)
            with rec.check(kernel="sparse_value_grad", dtype=fam, shape=shape) as row:
                got = sparse_value_grad(*_to(ctx, grad, indices, W))
                want = torch.einsum("nd,nwd->nw", grad.double(), W.double()[indices])
                row.update(compare(got, want, 4 * TOL["fp32"][0] * d_in**0.5, TOL["fp32"][1]))  # fp32 out


def segment_group(rec, ctx) -> None:
    from fastsae.kernels.segment_reduce import segment_reduce

    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        fam = DTYPE_FAMILY[dtype]
        atol, rtol = TOL[fam]
        for n, width, d_in, d_sae in shapes(ctx.dry)["segment"]:
            shape = f"N {n}, width {width}, d_in {d_in}, d_sae {d_sae}"
            g = _gen(n + 1)
            indices = torch.randint(0, d_sae, (n, width), generator=g)
            coef = torch.randn(n, width, generator=g)
            coef[coef.abs() < 0.3] = 0  # padding / latents that did not fire
            y = torch.randn(n, d_in, generator=g).to(dtype)
            # out = Mᵀ y with M (N, d_sae) holding each row's coefficients at its latents
            M = torch.zeros(n, d_sae, dtype=torch.float64).index_put_(
                (torch.arange(n).repeat_interleave(width), indices.reshape(-1)), coef.reshape(-1).double(),
                accumulate=True)
            expected, expected_sum = M.T @ y.double(), M.sum(0)
            scale = 4 * (n * width / d_sae + 1) ** 0.5
            for out_dtype in sorted({dtype, torch.float32}, key=str):
                config = f"out {DTYPE_FAMILY[out_dtype]}" + (" + sums" if out_dtype == torch.float32 else "")
                with rec.check(kernel="segment_reduce", dtype=fam, shape=shape, config=config) as row:
                    args = _to(ctx, indices, coef, y)
                    if out_dtype == torch.float32:
                        out, out_sum = segment_reduce(*args, d_sae, out_dtype=out_dtype, with_sum=True)
                        again = segment_reduce(*args, d_sae, out_dtype=out_dtype)
                        row.update(worst(compare(out, expected, atol * scale, TOL["fp32"][1]),
                                         compare(out_sum, expected_sum, atol * scale, TOL["fp32"][1])))
                    else:
                        out = segment_reduce(*args, d_sae, out_dtype=out_dtype)
                        again = segment_reduce(*args, d_sae, out_dtype=out_dtype)
                        row.update(compare(out, expected, atol * scale, rtol))
                    row["deterministic"] = bool(torch.equal(out, again))
                    row["passed"] = row["tol_ratio"] <= 1 and row["deterministic"]


def adam_resample_group(rec, ctx) -> None:
    from fastsae.kernels.adam import adam_step
    from fastsae.kernels.resample import resample_rows
    from fastsae.ops import reference

    # (param dtype, state dtype); lr 5e-2 so that a skipped or half-applied update shows past bf16 rounding.
    # fp32: elementwise against float64 (tests/train/test_optim.py's bounds). 16-bit parameters: both sides round
    # each value once to the dtype, values near zero come from cancellation, and the moments inherit the
    # parameters' rounding (the unit-row projection uses them), so the bounds are on norms: each tensor
    # within two unit roundoffs of the reference, and the update itself (p - p0) within 25%.
    for p_dtype, s_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        for shape, rows in shapes(ctx.dry)["adam"]:
            g = _gen(sum(shape))
            p0 = torch.randn(shape, generator=g)
            if rows:
                p0 /= p0.norm(dim=1, keepdim=True)
            p0 = p0.to(p_dtype)
            m0 = (0.1 * torch.randn(shape, generator=g)).to(s_dtype)
            v0 = (0.01 * torch.rand(shape, generator=g)).to(s_dtype)
            grads = [torch.randn(shape, generator=g).to(p_dtype) for _ in range(3)]
            name = dict(kernel="adam", dtype=f"{DTYPE_FAMILY[p_dtype]}, state {DTYPE_FAMILY[s_dtype]}",
                        shape=str(tuple(shape)), config="unit rows" if rows else "elementwise")
            with rec.check(**name) as row:
                p, m, v = _to(ctx, p0.clone(), m0.clone(), v0.clone())
                p2, m2, v2 = p0.clone(), m0.clone(), v0.clone()
                for step, grad in enumerate(grads, 1):
                    kw = dict(step=step, lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, rows=rows)
                    adam_step(p, grad.to(ctx.device), m, v, **kw)
                    reference.adam_step(p2, grad, m2, v2, **kw)
                results = []
                fam = DTYPE_FAMILY[p_dtype]
                for got, want in ((p, p2), (m, m2), (v, v2)):
                    if fam == "fp32":
                        results.append(compare(got, want, 1e-6, 1e-5))
                    else:  # the moments inherit the 16-bit parameters' rounding through the gradient's projection
                        rtol = 2 * TOL[DTYPE_FAMILY[want.dtype]][1] if want.dtype != torch.float32 else 2 * TOL[fam][1]
                        r = compare(got, want, 1e-6, rtol)
                        r["tol_ratio"] = r["rel_err"] / rtol
                        results.append(r)
                row.update(worst(*results))
                delta, delta_ref = p.cpu().double() - p0.double(), p2.double() - p0.double()
                row["update_rel_err"] = float((delta - delta_ref).norm() / delta_ref.norm())
                row["passed"] = row["tol_ratio"] <= 1 and row["update_rel_err"] <= (
                    1e-4 if p_dtype == torch.float32 else 0.25)
    d_sae, d_in = 50, 130
    for dtype in (torch.float32, torch.bfloat16):
        for has_enc in (True, False):
            for has_state in (True, False):
                name = dict(kernel="resample", dtype=DTYPE_FAMILY[dtype], shape=f"d_sae {d_sae}, d_in {d_in}",
                            config=f"{'encoder' if has_enc else 'tied'}{', state' if has_state else ''}")
                with rec.check(**name) as row:
                    g = _gen(7)
                    W_dec, W_enc = torch.randn(d_sae, d_in, generator=g), torch.randn(d_sae, d_in, generator=g)
                    W_dec, W_enc, b_enc = W_dec.to(dtype), W_enc.to(dtype), torch.randn(d_sae, generator=g).to(dtype)
                    latents = torch.tensor([0, 3, 17, 49])
                    u = torch.randn(4, d_in, generator=g)
                    u /= u.norm(dim=1, keepdim=True)
                    state = {"m_dec": torch.randn(d_sae, d_in, generator=g), "v_dec": torch.rand(d_sae, d_in),
                             "m_b": torch.randn(d_sae, generator=g), "v_b": torch.rand(d_sae)}
                    if has_enc:
                        state.update(m_enc=torch.randn(d_sae, d_in, generator=g), v_enc=torch.rand(d_sae, d_in))
                    before = {"W_dec": W_dec, "W_enc": W_enc, "b_enc": b_enc, **state}
                    mine = {key: t.clone().to(ctx.device) for key, t in before.items()}
                    ref = {key: t.clone() for key, t in before.items()}
                    resample_rows(latents.to(ctx.device), u.to(ctx.device), mine["W_dec"],
                                  mine["W_enc"] if has_enc else None, mine["b_enc"], 0.7,
                                  {key: mine[key] for key in state} if has_state else None)
                    reference.resample_rows(latents, u, ref["W_dec"], ref["W_enc"] if has_enc else None, ref["b_enc"],
                                            0.7, {key: ref[key] for key in state} if has_state else None)
                    rtol = 1e-6 if dtype == torch.float32 else 2 * TOL["bf16"][1]  # the encoder rows' one rounding
                    row.update(worst(*(compare(mine[key], ref[key], 0.0, rtol) for key in before)))
                    kept = torch.ones(d_sae, dtype=torch.bool)
                    kept[latents] = False
                    row["other_rows_untouched"] = all(torch.equal(mine[key].cpu()[kept], before[key][kept])
                                                      for key in before)
                    row["passed"] = row["tol_ratio"] <= 1 and row["other_rows_untouched"]


# ---- whole SAEs through the Triton backend --------------------------------------------------------------


def make_sae(d_in, d_sae, activation, k=None, dtype="float32", seed=0):
    """An SAE with non-trivial biases and an encoder that is not the decoder's transpose (as tests/conftest.py)."""
    from fastsae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, dtype=dtype), seed=seed)
    g = _gen(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g).to(sae.W_enc))
    return sae


def run_sae(sae, x, backend: str):
    """Forward + backward of the loss: (x_hat, loss, {name: grad} with x's gradient as 'x')."""
    from fastsae import use_backend

    sae.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        out = sae(x)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in sae.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.detach().clone()
    return out.x_hat.detach(), out.loss.detach(), grads


SAE_ACTIVATIONS = (("relu", None), ("topk", 8), ("jumprelu", None), ("batchtopk", 4))


def sae_fp32_group(rec, ctx) -> None:
    """Exact fp32 (FASTSAE_FP32_MATMUL=ieee), elementwise (tests/ops/test_gpu.py's bounds): the autograd wiring
    of every activation around the compiled kernels. (TF32 is checked kernel by kernel above: its 1e-3
    pre-activation error swaps near-tied latents in a few rows of a TopK selection, which moves those rows
    of x_hat by a whole decoder row, so whole-SAE elementwise bounds do not hold for it.)"""
    n, d_in, d_sae, k_max = shapes(ctx.dry)["sae"]
    atol, rtol = TOL["fp32"]
    for activation, k in SAE_ACTIVATIONS:
        k = None if k is None else min(k, k_max)
        name = dict(kernel="SAE forward + backward", dtype="fp32", shape=f"N {n}, d_in {d_in}, d_sae {d_sae}",
                    config=f"{activation}" + (f" k {k}" if k else ""))
        with rec.check(**name) as row, fp32_matmul("ieee"), autotune(False):
            sae = make_sae(d_in, d_sae, activation, k)
            ref = copy.deepcopy(sae).double()
            x = torch.randn(n, d_in, generator=_gen(11))
            xh_ref, loss_ref, g_ref = run_sae(ref, x.double(), "reference")
            xh, loss, g = run_sae(sae.to(ctx.device), x.to(ctx.device), "triton")
            results = [compare(xh, xh_ref, 10 * atol, rtol), compare(loss, loss_ref, 20 * atol, 10 * rtol)]
            results += [compare(g[key], g_ref[key], 50 * atol, 10 * rtol) for key in g_ref]
            row.update(worst(*results))
            row["passed"] = row["tol_ratio"] <= 1 and set(g) == set(g_ref)


def aggregate_rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def against_reference(sae, x, ctx, limits=(2e-2, 5e-2)) -> dict:
    """A 16-bit SAE's forward + backward on the Triton backend and on the torch backend, each against the
    float64 reference of the same weights and inputs, in aggregate (‖a − b‖ / ‖b‖ of x_hat and of every
    gradient). 16-bit rounding of the encoder's input swaps near-tied latents in the selections (often, for
    BatchTopK's batch-wide threshold), so elementwise bounds do not apply. A tensor passes when the Triton
    error is within limits (x_hat, gradients: tests/ops/test_gpu.py's) or at most twice the torch backend's own
    (STYLE.md: the kernel's error against the reference at most about twice PyTorch's in the same dtype)."""
    ref = copy.deepcopy(sae).double()
    xh_ref, _, g_ref = run_sae(ref, x.double(), "reference")
    del ref
    xh_k, _, g_k = run_sae(sae, x, "triton")
    xh_t, _, g_t = run_sae(sae, x, "torch")
    out = {"x_hat_rel_err": aggregate_rel(xh_k, xh_ref), "torch_x_hat_rel_err": aggregate_rel(xh_t, xh_ref),
           "grad_rel_err": {key: aggregate_rel(g_k[key], g_ref[key]) for key in g_ref},
           "torch_grad_rel_err": {key: aggregate_rel(g_t[key], g_ref[key]) for key in g_ref}}
    ratios = [out["x_hat_rel_err"] / max(limits[0], 2 * out["torch_x_hat_rel_err"])]
    ratios += [out["grad_rel_err"][key] / max(limits[1], 2 * out["torch_grad_rel_err"][key]) for key in g_ref]
    out["rel_err"] = max(out["x_hat_rel_err"], *out["grad_rel_err"].values())
    out["tol_ratio"] = max(ratios)
    out["passed"] = out["tol_ratio"] <= 1 and set(g_k) == set(g_ref)
    return out


def sae_bf16_group(rec, ctx) -> None:
    n, d_in, d_sae, k_max = shapes(ctx.dry)["sae_bf16"]
    for activation, k in SAE_ACTIVATIONS:
        if activation not in shapes(ctx.dry)["sae_bf16_activations"]:
            continue
        k = None if k is None else k_max
        name = dict(kernel="SAE forward + backward", dtype="bf16", shape=f"N {n}, d_in {d_in}, d_sae {d_sae}",
                    config=f"{activation}" + (f" k {k}" if k else ""))
        with rec.check(**name) as row, autotune(False):
            sae = make_sae(d_in, d_sae, activation, k, dtype="bfloat16").to(ctx.device)
            x = torch.randn(n, d_in, generator=_gen(12)).to(torch.bfloat16).to(ctx.device)
            row.update(against_reference(sae, x, ctx))


def realistic_group(rec, ctx) -> None:
    """The fused TopK encoder where it is used: at the target shape, rows from every part of the batch
    against float64, and the memory a call takes beyond its inputs (the second call's: the first one
    autotunes, and triton.testing.do_bench holds a 256 MB buffer for flushing L2), which must stay far
    below the (N, d_sae) pre-activations it never writes; and at N·d_sae past 2^31, where the last latents
    win every row, so that their offsets are the largest."""
    from fastsae.ops import triton_backend

    for key in ("realistic", "past_2_31"):
        n, d_in, d_sae, k = shapes(ctx.dry)[key]
        with rec.check(kernel="encoder_topk (Triton backend op)", dtype="bf16",
                       shape=f"N {n}, d_in {d_in}, d_sae {d_sae}, k {k}",
                       config="autotuned" if key == "realistic" else "first config") as row, \
                autotune(key == "realistic"):
            x, W, b = encoder_inputs(ctx, n, d_in, d_sae, torch.bfloat16, seed=5)
            if key == "past_2_31":
                b[-3:] = 8.0
            with torch.no_grad():
                values, indices = triton_backend.encode_topk(x, W, b, k)
            if ctx.device.type == "cuda":
                del values, indices
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    values, indices = triton_backend.encode_topk(x, W, b, k)
                torch.cuda.synchronize()
                row["extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row["pre_activations_mib"] = n * d_sae * 2 / 2**20
            rows = torch.unique(torch.cat([torch.arange(0, n, max(1, n // 32)), torch.tensor([n - 1])]))
            rows_dev = rows.to(ctx.device)
            pre = pre64(x[rows_dev], W, b).relu()
            row.update(check_topk_values(values[rows_dev], indices[rows_dev], pre, k, "bf16", _scale("bf16", d_in)))
            row["rows_checked"] = int(rows.numel())
            if "extra_mib" in row:  # about N·S·CAP·8 bytes of candidate lists: N·k-sized, never N·d_sae
                row["passed"] = row["passed"] and row["extra_mib"] < row["pre_activations_mib"] / 4


def step_bf16_group(rec, ctx) -> None:
    from fastsae import SAE, SAEConfig

    n, d_in, d_sae, k = shapes(ctx.dry)["step"]
    with rec.check(kernel="SAE forward + backward", dtype="bf16", shape=f"N {n}, d_in {d_in}, d_sae {d_sae}, k {k}",
                   config="topk (SAE's own init)") as row, autotune(False):
        sae = SAE(SAEConfig(d_in, d_sae, activation="topk", k=k, dtype="bfloat16"), device=ctx.device, seed=0)
        with torch.no_grad():
            sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        x = torch.randn(n, d_in, device=ctx.device, dtype=torch.bfloat16)
        row.update(against_reference(sae, x, ctx))


def run_group(name: str, rec, ctx) -> None:
    runs = {
        "topk-bf16": lambda: topk_group(rec, ctx, ("bf16",), (64,)),
        "topk-bf16-wide": lambda: topk_group(rec, ctx, ("bf16",), (128, 256)),
        "topk-fp16": lambda: topk_group(rec, ctx, ("fp16",), (64,)),
        "topk-fp16-wide": lambda: topk_group(rec, ctx, ("fp16",), (128, 256)),
        "topk-tf32": lambda: topk_group(rec, ctx, ("tf32",), (64, 128, 256)),
        "topk-fp32": lambda: topk_group(rec, ctx, ("fp32",), (64, 128, 256)),
        "topk-edges": lambda: topk_group(rec, ctx, tuple(FAMILIES), (), edges=True),
        "threshold-bf16": lambda: threshold_group(rec, ctx, ("bf16",)),
        "threshold-fp16": lambda: threshold_group(rec, ctx, ("fp16",)),
        "threshold-fp32": lambda: threshold_group(rec, ctx, ("tf32", "fp32")),
        "decode": lambda: decode_group(rec, ctx),
        "segment": lambda: segment_group(rec, ctx),
        "adam-resample": lambda: adam_resample_group(rec, ctx),
        "sae-fp32": lambda: sae_fp32_group(rec, ctx),
        "sae-bf16": lambda: sae_bf16_group(rec, ctx),
        "realistic": lambda: realistic_group(rec, ctx),
        "step-bf16": lambda: step_bf16_group(rec, ctx),
    }
    assert set(runs) == set(GROUPS)
    runs[name]()
