"""What the GPU check times: the cases of bench/suite.py at the check's shapes, as closures of one
iteration each (the floor's GEMM, fastsae on the Triton backend, naive PyTorch eager or torch.compile'd),
and the metrics of a timed row (TFLOP/s, GB/s, x floor, x GEMM)."""

from __future__ import annotations

import contextlib
import dataclasses

from bench.gpu_job import Ctx


def case(op: str, d_sae: int, k: int | None, shape: dict, activation: str = "topk", density: float | None = None):
    from bench.suite import Case

    return Case(op, activation, shape["n"], shape["d_in"], d_sae, k, density)


def gemm_closure(c, ctx: Ctx, dtype):
    """The floor's GEMM, x @ W_enc^T, of the case's shape (the vendor library's)."""
    import torch

    x = torch.randn(c.n, c.d_in, device=ctx.device, dtype=dtype)
    W = torch.randn(c.d_sae, c.d_in, device=ctx.device, dtype=dtype)
    return lambda: x @ W.T


def fastsae_closure(op: str, c, ctx: Ctx, dtype, mixed: bool = False):
    """One iteration of fastsae on the Triton backend (Triton's interpreter in the dry run) with the fused
    optimizer the trainer picks on CUDA. Ops: the suite's (bench/suite.py), and forward_backward (the step
    without its optimizer) and trainer_step (Trainer.step, metrics off; mixed: fp32 master weights and bf16
    compute, the trainer's mixed precision)."""
    import torch

    from bench import suite
    from fastsae import use_backend
    from fastsae.train import TrainConfig, Trainer

    x = torch.randn(c.n, c.d_in, device=ctx.device, dtype=dtype)
    if op in ("decode", "resample"):
        return suite._build_fastsae(c, "triton", x)
    sae = suite._sae(c, ctx.device, torch.float32 if mixed else dtype)
    if op == "encode":
        sae.eval()

        def encode():
            with use_backend("triton"), torch.no_grad():
                return sae.encode(x)
        return encode
    if op == "encoder":
        def encoder():
            sae.zero_grad(set_to_none=True)
            with use_backend("triton"):
                sae.encode(x).values.float().sum().backward()
        return encoder
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-4, progress=False, optimizer="fused",
                                            mixed_precision="bfloat16" if mixed else None))
    opt = trainer.optimizer
    if op == "optimizer":
        for p in sae.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)

        def optimizer():
            with use_backend("triton"):
                opt.step()
        return optimizer
    if op == "trainer_step":
        def trainer_step():
            with use_backend("triton"):
                trainer.step(x, metrics=False)
        return trainer_step

    def step():
        opt.zero_grad(set_to_none=True)
        with use_backend("triton"):
            sae(x).loss.backward()
            if op == "step":
                opt.step()
    if op not in ("step", "forward_backward"):
        raise ValueError(f"unknown op {op!r}")
    return step


def naive_closure(op: str, c, ctx: Ctx, dtype, compile_backend: str | None = None):
    """The plain dense SAE of bench/suite.py (the (N, d_sae) activations exist), eager or torch.compile'd with
    compile_backend ("inductor" on a GPU; "eager" in the dry run: dynamo's tracing without code generation)."""
    import torch

    from bench import suite

    x = torch.randn(c.n, c.d_in, device=ctx.device, dtype=dtype)
    if op not in ("encoder", "step"):
        return None if compile_backend else suite._build_naive(c, x, compiled=False)
    sae = suite._sae(c, ctx.device, dtype)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    wrap = (lambda f: torch.compile(f, dynamic=False, backend=compile_backend)) if compile_backend else (lambda f: f)
    if op == "encoder":
        encode = wrap(suite.naive_encode)

        def encoder():
            for p in params:
                p.grad = None
            encode(x, sae.W_enc, sae.b_enc, sae.b_dec, c.activation, c.k).float().sum().backward()
        return encoder
    return suite.naive_step(sae, x, params, wrap(suite.naive_forward), c)


def compile_limits() -> None:
    """Room for every shape of the sweep in dynamo's cache (past its default limit of 8 recompiles per
    function it would silently run the sweep's later shapes eagerly)."""
    import torch._dynamo

    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512),
                        ("accumulated_recompile_limit", 512)):
        if hasattr(torch._dynamo.config, name):
            with contextlib.suppress(Exception):  # an alias a torch version has retired
                setattr(torch._dynamo.config, name, value)


def metrics(row: dict, c, dtype, gemm_ms: float | None, bandwidth: float | None, op: str | None = None) -> dict:
    """TFLOP/s (dense-equivalent), GB/s over the op's minimum bytes, x floor (GEMM + min bytes / copy
    bandwidth, bench/suite.py) and x GEMM."""
    from bench.suite import OPS, dense_flops, min_bytes

    if row.get("status") != "ok":
        return row
    op = op or c.op
    c = dataclasses.replace(c, op=op) if op in OPS else c
    seconds = row["ms"] * 1e-3
    if op in OPS:
        flops = dense_flops(c)
        row["tflops"] = flops / seconds / 1e12 if flops else None
        row["gbps"] = min_bytes(c, dtype) / seconds / 1e9
        if gemm_ms and bandwidth:
            floor = (gemm_ms if op in ("encode", "encoder", "step") else 0) + min_bytes(c, dtype) / bandwidth * 1e3
            row["x_floor"] = row["ms"] / floor
    if gemm_ms:
        row["x_gemm"] = row["ms"] / gemm_ms
    return row
