"""The benchmark suite: fastsae's kernels and training step against naive PyTorch, other libraries and the floor.

Every implementation of a case gets identical inputs. For each we record the
median time (triton.testing.do_bench on CUDA, a warmed-up perf_counter median
on CPU), the dense-equivalent TFLOP/s, GB/s over the minimum bytes the op must
move, the ratio to the floor of the same run, and the peak memory on CUDA. An
out-of-memory error is a result ("oom"), not a crash.

The floor (DESIGN.md): an SAE step should cost about one dense GEMM, the
encoder forward, plus the optimizer's memory traffic. Per op:
    floor = (vendor GEMM x @ W_enc^T at this shape, if the op needs one) + min_bytes / copy bandwidth
with the GEMM and the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn.functional as F

from bench.other_libraries import build_saelens, build_sparsify
from fastsae import SAE, SAEConfig, SparseLatents, use_backend
from fastsae.train import TrainConfig, Trainer
from fastsae.train.resample import resample_dead_latents

OPS = ("encode", "encoder", "decode", "optimizer", "resample", "step")
IMPLEMENTATIONS = ("naive", "naive_compile", "fastsae_torch", "fastsae_triton", "saelens", "sparsify")
# How many x @ W_enc^T GEMMs (of N rows) each op needs at least; resample scores a pool of 4N rows.
GEMMS = {"encode": 1, "encoder": 1, "step": 1, "resample": 4}


@dataclass(frozen=True)
class Case:
    op: str  # one of OPS
    activation: str  # "topk" | "batchtopk" | "relu"
    n: int
    d_in: int
    d_sae: int
    k: int | None = None  # topk/batchtopk
    density: float | None = None  # relu: target fraction of latents active

    def label(self) -> str:
        sparsity = f"k={self.k}" if self.k else f"density={self.density:g}"
        return f"{self.op} {self.activation} N={self.n} d_in={self.d_in} d_sae={self.d_sae} {sparsity}"

    @property
    def active(self) -> int:
        return self.k or max(1, round(self.density * self.d_sae))


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


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "memory" in str(err).lower()


def measure(make: Callable[[], Callable[[], object] | None], device: torch.device, repeats: int) -> dict | None:
    """Build (make) and time one implementation; None when it cannot run here."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        fn = make()
        if fn is None:
            return None
        ms = time_ms(fn, device, repeats)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        return {"status": "oom"}
    out = {"status": "ok", "ms": ms}
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty((256 if device.type == "cuda" else 64) * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=5)
    return 2 * src.numel() * 4 / (ms * 1e-3)


# ---- what each op must cost at least ------------------------------------------------------------------


def dense_flops(case: Case) -> float | None:
    """The dense SAE's FLOPs for the op, what TFLOP/s are quoted against (None for gather-bound ops)."""
    gemm = 2 * case.n * case.d_in * case.d_sae
    return {"encode": gemm, "encoder": 3 * gemm, "step": 6 * gemm}.get(case.op)


def min_bytes(case: Case, dtype: torch.dtype) -> int:
    e = torch.finfo(dtype).bits // 8
    weights = case.d_sae * case.d_in  # one weight matrix
    acts = case.n * case.d_in
    latents = case.n * case.active * (e + 8)
    adam = 2 * weights * (3 * e + 4 * 4)  # W_enc, W_dec: read w, g; write w; read + write m, v (fp32)
    return {
        "encode": e * (weights + acts) + latents,
        "encoder": e * (2 * weights + 2 * acts) + latents,  # + the weight gradient
        "decode": e * (2 * weights + 3 * acts) + latents,  # read W_dec, write its gradient
        "optimizer": adam,
        "resample": e * (weights + acts),  # one pass over the pool and the weights
        "step": e * (4 * weights + 4 * acts) + 2 * latents + adam,
    }[case.op]


# ---- implementations --------------------------------------------------------------------------------


def naive_forward(x, W_enc, b_enc, W_dec, b_dec, activation: str, k: int | None, l1: float):
    """A plain dense SAE, the way most SAE code is written: the (N, d_sae) activations exist."""
    z = naive_encode(x, W_enc, b_enc, b_dec, activation, k)
    x_hat = z @ W_dec + b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if activation == "relu":
        loss = loss + l1 * (z * W_dec.norm(dim=1)).sum(-1).mean()
    return loss


def naive_encode(x, W_enc, b_enc, b_dec, activation: str, k: int | None):
    pre = F.relu((x - b_dec) @ W_enc.T + b_enc)  # (N, d_sae)
    if activation == "topk":
        vals, idx = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)
    if activation == "batchtopk":
        flat = pre.flatten()
        vals, idx = flat.topk(k * x.shape[0])
        return torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)
    return pre


def _sae(case: Case, device, dtype) -> SAE:
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    sae = SAE(SAEConfig(case.d_in, case.d_sae, activation=case.activation, k=case.k, dtype=names[dtype]),
              device=device, seed=0)
    sae.check_finite = False
    if case.activation == "relu":
        # pre = W_enc x + b with unit rows and x ~ N(0, I) is ~ N(b, 1): shift b for the density asked
        with torch.no_grad():
            sae.b_enc.fill_(-NormalDist().inv_cdf(1 - case.density))
    return sae


def _latents(case: Case, device, dtype) -> SparseLatents:
    gen = torch.Generator(device=device).manual_seed(1)
    idx = torch.randint(0, case.d_sae, (case.n, case.active), device=device, generator=gen)
    vals = torch.rand(case.n, case.active, device=device, generator=gen).to(dtype).requires_grad_()
    return SparseLatents(vals, idx, case.d_sae)


def build(case: Case, impl: str, device: torch.device, dtype: torch.dtype) -> Callable[[], object] | None:
    """A closure running one iteration of case with impl, or None when impl cannot run it here."""
    x = torch.randn(case.n, case.d_in, device=device, dtype=dtype)
    if impl.startswith("fastsae_"):
        backend = impl.removeprefix("fastsae_")
        if backend == "triton" and device.type != "cuda":
            return None
        return _build_fastsae(case, backend, x)
    if impl in ("naive", "naive_compile"):
        return _build_naive(case, x, compiled=impl == "naive_compile")
    if impl == "saelens":
        return build_saelens(case, x)
    if impl == "sparsify":
        return build_sparsify(case, x)
    raise ValueError(f"unknown implementation {impl!r}")


def _build_fastsae(case: Case, backend: str, x: torch.Tensor):
    sae = _sae(case, x.device, x.dtype)
    op = case.op
    if op == "encode":
        sae.eval()

        def encode():
            with use_backend(backend), torch.no_grad():
                return sae.encode(x)
        return encode
    if op == "encoder":
        def encoder():
            with use_backend(backend):
                sae.encode(x).values.float().sum().backward()
        return encoder
    if op == "decode":
        lat = _latents(case, x.device, x.dtype)

        def decode():
            with use_backend(backend):
                sae.decode(lat).float().sum().backward()
        return decode
    opt, constrain = _trainer_optimizer(sae)
    if op == "optimizer":
        for p in sae.parameters():
            p.grad = torch.randn_like(p)

        def optimizer():
            with use_backend(backend):  # the backend picks the fused step's implementation too
                _optimizer_step(sae, opt, constrain)
        return optimizer
    if op == "resample":
        dead = torch.rand(case.d_sae, device=x.device) < 0.1
        pool = torch.randn(4 * case.n, case.d_in, device=x.device, dtype=x.dtype)

        def resample():
            with use_backend(backend):
                resample_dead_latents(sae, dead, pool)
        return resample
    def step():
        opt.zero_grad(set_to_none=True)
        with use_backend(backend):
            sae(x).loss.backward()
            _optimizer_step(sae, opt, constrain)
    return step


def _trainer_optimizer(sae: SAE) -> tuple[torch.optim.Optimizer, bool]:
    """The optimizer fastsae's trainer picks on this device, and whether the constraint is a separate pass."""
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-4, progress=False))
    return trainer.optimizer, sae.cfg.normalize_decoder and not trainer.fused


def _optimizer_step(sae: SAE, opt: torch.optim.Optimizer, constrain: bool) -> None:
    if constrain:
        sae.remove_parallel_decoder_grad_()
    opt.step()
    if constrain:
        sae.normalize_decoder_()


def _build_naive(case: Case, x: torch.Tensor, compiled: bool):
    sae = _sae(case, x.device, x.dtype)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    op = case.op
    if op == "resample":
        return None  # most SAE code has none to compare with
    if op == "optimizer":  # torch.optim.Adam and the constraint as separate passes
        if compiled:
            return None
        opt = torch.optim.Adam(params, lr=1e-4)
        for p in params:
            p.grad = torch.randn_like(p)

        def optimizer():
            sae.remove_parallel_decoder_grad_()
            opt.step()
            sae.normalize_decoder_()
        return optimizer
    encode = torch.compile(naive_encode, dynamic=False) if compiled else naive_encode
    forward = torch.compile(naive_forward, dynamic=False) if compiled else naive_forward
    if op == "encode":
        def run_encode():
            with torch.no_grad():
                return encode(x, sae.W_enc, sae.b_enc, sae.b_dec, case.activation, case.k)
        return run_encode
    if op == "encoder":
        return lambda: encode(x, sae.W_enc, sae.b_enc, sae.b_dec, case.activation, case.k).float().sum().backward()
    if op == "decode":
        lat = _latents(case, x.device, x.dtype)
        return lambda: (lat.to_dense() @ sae.W_dec + sae.b_dec).float().sum().backward()
    return naive_step(sae, x, params, forward, case)


def naive_step(sae, x: torch.Tensor, params: list, forward: Callable, case: Case) -> Callable[[], None]:
    """A training step as most SAE code writes it: the dense forward (naive_forward, or its compiled form),
    torch.optim.Adam, and the decoder constraint as separate passes."""
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        forward(x, *params, case.activation, case.k, sae.cfg.l1_coefficient).backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
    return step


# ---- one case ---------------------------------------------------------------------------------------


def floor_ms(case: Case, device: torch.device, dtype: torch.dtype, bandwidth: float, repeats: int) -> dict:
    """The floor of this case, measured now: vendor GEMM (if the op needs one) + min bytes / copy bandwidth."""
    out = {"bytes_ms": min_bytes(case, dtype) / bandwidth * 1e3, "gemm_ms": 0.0}
    if case.op in GEMMS:
        def make():
            x = torch.randn(case.n, case.d_in, device=device, dtype=dtype)
            W = torch.randn(case.d_sae, case.d_in, device=device, dtype=dtype)
            return lambda: x @ W.T
        gemm = measure(make, device, repeats)
        if gemm["status"] != "ok":
            return {"status": gemm["status"]}
        out["gemm_ms"] = GEMMS[case.op] * gemm["ms"]
    out["status"] = "ok"
    out["ms"] = out["gemm_ms"] + out["bytes_ms"]
    return out


def run_case(case: Case, impls: tuple[str, ...], device: torch.device, dtype: torch.dtype, repeats: int,
             bandwidth: float) -> list[dict]:
    floor = floor_ms(case, device, dtype, bandwidth, repeats)
    rows = [{**dataclasses.asdict(case), "impl": "floor", **floor}]
    for impl in impls:
        result = measure(lambda impl=impl: build(case, impl, device, dtype), device, repeats)
        if result is None:
            continue
        row = {**dataclasses.asdict(case), "impl": impl, **result}
        if result["status"] == "ok":
            seconds = result["ms"] * 1e-3
            flops = dense_flops(case)
            row["tflops"] = flops / seconds / 1e12 if flops else None
            row["gbps"] = min_bytes(case, dtype) / seconds / 1e9
            if floor["status"] == "ok":
                row["x_floor"] = result["ms"] / floor["ms"]
        rows.append(row)
    return rows


def largest_trainable_d_sae(impl: str, budget_gib: float, d_in: int, n: int, k: int, device: torch.device,
                            dtype: torch.dtype, start: int = 2**14, limit: int = 2**24) -> int | None:
    """The largest power-of-two d_sae whose TopK training step fits in budget_gib (CUDA)."""
    if device.type != "cuda":
        raise RuntimeError("the scale search needs CUDA (its budget is enforced on the GPU's allocator)")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total), device)
    best, d_sae = None, start
    try:
        while d_sae <= limit:
            case = Case("step", "topk", n, d_in, d_sae, k)
            result = measure(lambda case=case: build(case, impl, device, dtype), device, repeats=1)
            if result is None or result["status"] != "ok":
                break
            best, d_sae = d_sae, 2 * d_sae
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return best


def planned_largest_d_sae(impl: str, budget_gib: float, d_in: int, n: int, k: int, device: torch.device,
                          dtype: torch.dtype) -> int:
    """The memory planner's largest d_sae for the `step` case of a fastsae implementation: weights and
    compute in dtype, fp32 Adam moments, the optimizer the trainer picks on device (fastsae.train.plan)."""
    from fastsae.train.plan import GIB, PlanConfig, largest_d_sae

    name = str(dtype).removeprefix("torch.")
    cfg = PlanConfig(d_in, 2**14, k, n, weights=name, compute=name, backend=impl.removeprefix("fastsae_"),
                     optimizer="fused" if device.type == "cuda" else "torch")
    return largest_d_sae(cfg, budget_gib * GIB)
