"""The benchmark suite: fastsae's kernels and training step against naive PyTorch, other libraries and the floor.

Every implementation gets identical inputs. For each case we record the median
time (triton.testing.do_bench on CUDA, a warmed-up perf_counter median on CPU),
the dense-equivalent TFLOP/s, the ratio to the floor measured in the same run
(the vendor dense GEMM x @ W_enc^T at the same shape), and the peak memory on
CUDA. An out-of-memory error is a result ("oom"), not a crash.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsae import SAE, SAEConfig, use_backend


@dataclass(frozen=True)
class Case:
    op: str  # "encode" (inference encode) | "step" (forward + backward + Adam)
    activation: str  # "topk" | "batchtopk" | "relu"
    n: int
    d_in: int
    d_sae: int
    k: int | None = None  # topk/batchtopk
    density: float | None = None  # relu: target fraction of latents active

    def label(self) -> str:
        sparsity = f"k={self.k}" if self.k else f"density={self.density:g}"
        return f"{self.op} {self.activation} N={self.n} d_in={self.d_in} d_sae={self.d_sae} {sparsity}"


# ---- timing -----------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        ms = time_ms(fn, device, repeats)
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom"}
    except (RuntimeError, MemoryError) as err:  # CPU allocations fail as RuntimeError
        if "memory" not in str(err).lower():
            raise
        return {"status": "oom"}
    out = {"status": "ok", "ms": ms}
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


# ---- implementations --------------------------------------------------------------------------------


def naive_forward(x, W_enc, b_enc, W_dec, b_dec, activation: str, k: int | None, l1: float):
    """A plain dense SAE, the way most SAE code is written: the (N, d_sae) activations exist."""
    pre = F.relu((x - b_dec) @ W_enc.T + b_enc)  # (N, d_sae)
    if activation == "topk":
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
    elif activation == "batchtopk":
        flat = pre.flatten()
        vals, idx = flat.topk(k * x.shape[0])
        z = torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)
    else:
        z = pre
    x_hat = z @ W_dec + b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if activation == "relu":
        loss = loss + l1 * (z * W_dec.norm(dim=1)).sum(-1).mean()
    return loss


def _fastsae(case: Case, backend: str, device, dtype):
    sae = SAE(SAEConfig(case.d_in, case.d_sae, activation=case.activation, k=case.k,
                        dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]),
              device=device, seed=0)
    sae.check_finite = False
    if case.activation == "relu":
        _set_density(sae, case.density)
    return sae


def _set_density(sae: SAE, density: float) -> None:
    """Shift b_enc so that about `density` of the latents fire on unit-Gaussian inputs."""
    # pre = W_enc x + b with unit-norm rows and x ~ N(0, I): pre ~ N(b, 1)
    from statistics import NormalDist

    with torch.no_grad():
        sae.b_enc.fill_(-NormalDist().inv_cdf(1 - density))


def build(case: Case, impl: str, device: torch.device, dtype: torch.dtype) -> Callable[[], object] | None:
    """A closure running one iteration of case with impl, or None when impl cannot run here."""
    x = torch.randn(case.n, case.d_in, device=device, dtype=dtype)
    if impl == "floor_gemm":
        W = torch.randn(case.d_sae, case.d_in, device=device, dtype=dtype)
        return lambda: x @ W.T

    if impl in ("naive", "naive_compile"):
        sae = _fastsae(case, "torch", device, dtype)
        params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        fwd = naive_forward
        if impl == "naive_compile":
            fwd = torch.compile(naive_forward, dynamic=False)
        opt = torch.optim.Adam(params, lr=1e-4)
        l1 = sae.cfg.l1_coefficient
        if case.op == "encode":
            def encode():
                with torch.no_grad():
                    pre = F.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
                    return pre.topk(case.k, dim=-1) if case.k else pre
            return encode

        def step():
            opt.zero_grad(set_to_none=True)
            fwd(x, *params, case.activation, case.k, l1).backward()
            opt.step()
        return step

    if impl.startswith("fastsae_"):
        backend = impl.removeprefix("fastsae_")
        if backend == "triton" and device.type != "cuda":
            return None
        sae = _fastsae(case, backend, device, dtype)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        if case.op == "encode":
            sae.eval()

            def encode():
                with use_backend(backend), torch.no_grad():
                    return sae.encode(x)
            return encode

        def step():
            opt.zero_grad(set_to_none=True)
            with use_backend(backend):
                sae(x).loss.backward()
            if sae.cfg.normalize_decoder:
                sae.remove_parallel_decoder_grad_()
            opt.step()
            if sae.cfg.normalize_decoder:
                sae.normalize_decoder_()
        return step

    if impl == "saelens":
        try:
            from sae_lens import SAE as LensSAE
        except ImportError:
            return None
        if case.activation == "batchtopk":
            return None
        arch = {"topk": "topk", "relu": "standard"}[case.activation]
        cfg = {"architecture": arch, "d_in": case.d_in, "d_sae": case.d_sae, "dtype": str(dtype).removeprefix("torch."),
               "device": str(device), "apply_b_dec_to_input": True, "normalize_activations": "none"}
        if case.k:
            cfg["k"] = case.k
        lens = LensSAE.from_dict(cfg)
        opt = torch.optim.Adam(lens.parameters(), lr=1e-4)
        if case.op == "encode":
            def encode():
                with torch.no_grad():
                    return lens.encode(x)
            return encode

        def step():
            opt.zero_grad(set_to_none=True)
            (lens(x) - x).pow(2).sum(-1).mean().backward()
            opt.step()
        return step

    raise ValueError(f"unknown implementation {impl!r}")


IMPLEMENTATIONS = ("floor_gemm", "naive", "naive_compile", "fastsae_torch", "fastsae_triton", "saelens")


def dense_flops(case: Case) -> float:
    """FLOPs of the dense SAE at this shape: what TFLOP/s are quoted against."""
    gemm = 2 * case.n * case.d_in * case.d_sae
    return gemm if case.op == "encode" else 6 * gemm  # encoder + decoder, forward + 2 backward GEMMs each / 2


def run_case(case: Case, impls: tuple[str, ...], device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    rows = []
    floor = None
    for impl in ("floor_gemm", *[i for i in impls if i != "floor_gemm"]):
        try:
            fn = build(case, impl, device, dtype)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            fn, result = None, {"status": "oom"}
        else:
            result = None
        if fn is None and result is None:
            continue
        result = result or measure(fn, device, repeats)
        del fn
        row = {**dataclasses.asdict(case), "impl": impl, **result}
        if result["status"] == "ok":
            flops = 2 * case.n * case.d_in * case.d_sae if impl == "floor_gemm" else dense_flops(case)
            row["tflops"] = flops / (result["ms"] * 1e-3) / 1e12
            if impl == "floor_gemm":
                floor = result["ms"]
            elif floor:
                row["x_floor"] = result["ms"] / floor
        rows.append(row)
    return rows
