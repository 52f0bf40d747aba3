"""Stage 1's whole-SAE groups: forward + backward through the Triton backend against the float64
reference (exact fp32 elementwise; bf16 in aggregate, against twice the torch backend's own error), and the
fused TopK encoder at the target shape and past 2^31 elements (bench/gpu_correctness.py)."""

from __future__ import annotations

import copy

import torch

from bench.gpu_compare import (
    TOL,
    atol_scale,
    autotune,
    check_topk_values,
    compare,
    encoder_inputs,
    fp32_matmul,
    generator,
    pre64,
    shapes,
    worst,
)


def make_sae(d_in, d_sae, activation, k=None, dtype="float32", seed=0):
    """An SAE with non-trivial biases and an encoder that is not the decoder's transpose (as tests/conftest.py)."""
    from fastsae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, dtype=dtype), seed=seed)
    g = generator(seed + 1)
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
            x = torch.randn(n, d_in, generator=generator(11))
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
            x = torch.randn(n, d_in, generator=generator(12)).to(torch.bfloat16).to(ctx.device)
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
            row.update(check_topk_values(values[rows_dev], indices[rows_dev], pre, k, "bf16", atol_scale("bf16", d_in)))
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
