"""The memory planner: what one rank holds while training an SAE, and the largest d_sae that fits.

One model of a training step (the trainer's: forward, backward, Adam, decoder constraint), per rank of a
grid of `data` replicas × `latent_shards` (n = d_sae / latent_shards latents and b = batch / data rows
per rank), in bytes:

    weights       (m·n·d_in + n + d_in) · w             m = 2 matrices (1 when tied), w = master dtype
    gradients     the same, in the master dtype (dense: the sparse backward writes whole rows of zeros)
    optimizer     2 Adam moments of every weight, fp32 or bf16
    state         dead-latent counters (8n) and the resampling pool (pool · d_in · w)
    compute       bf16 copies of W_enc and W_dec under mixed precision (kept for the backward)
    activations   the batch and its centred copy, x_hat and the loss's temporaries (about 5 · b·d_in·4),
                  latents (12·b·k), sharded: the gathered candidates (16·b·k·shards) and the fp32 partial
                  x_hat; AuxK: copies of the dead rows and their candidates
    workspace     backend "triton": the fused encoder's candidates (8·b·splits·k_pad) and the backward's
                  latent sort (~40·b·k), plus the segment reduction's (n + 2)·8 offsets;
                  backend "torch": the dense pre-activations (b·n·c), which the fused kernels never write,
                  and its CSR offsets
    transients    the largest of: the forward's workspace, the backward's (an fp32 gradient row block
                  before the cast to the master dtype under mixed precision; data parallel on gloo, the
                  all-reduce's receive buffer of one gradient), the optimizer's ("torch": three fp32
                  temporaries of the largest weight; the fused Triton step: none)
    reserve       CUDA context and allocator slack, a fixed 1 GiB plus 5% (backend "triton" only)

The step's peak is everything persistent plus the largest transient: the previous step's gradients are
still alive during the forward (the trainer frees them just before the backward). Every term but the
reserve and a few constants is linear in n, so the largest d_sae that fits is solved for directly.
bench/plan_check.py checks the model against measured peaks (CPU: RSS; CUDA: the allocator's peak).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Programs the fused encoder aims for per SM (kernels/_common.py num_programs_target), and an H100's SMs.
PROGRAMS_PER_SM, DEFAULT_SMS = 4, 132
ENCODER_BLOCK_M, ENCODER_BLOCK_N = 32, 128  # the fused encoder's GPU tiles (kernels/_common.py)
CUDA_RESERVE_BYTES, CUDA_SLACK = GIB, 0.05


@dataclass(frozen=True)
class PlanConfig:
    d_in: int
    d_sae: int
    k: int = 64
    batch: int = 8192  # rows per optimizer step, over every data replica
    gpus: int = 1
    latent_shards: int | None = None  # None: every GPU holds a slice of the latents (the largest d_sae)
    weights: str = "float32"  # master weights (and gradients)
    compute: str = "bfloat16"  # bfloat16: mixed precision (bf16 GEMMs on bf16 weight copies); float32: none
    moments: str = "float32"  # Adam moments: float32 or bfloat16
    backend: str = "triton"  # "triton": fused kernels (GPU); "torch": dense pre-activations (CPU)
    optimizer: str = "fused"  # "fused" Triton Adam (no temporaries) or "torch"
    tied: bool = False
    activation: str = "topk"  # topk | batchtopk (its threshold is gathered over every rank) | relu | jumprelu
    resample_pool: int = 0  # rows kept for resampling (16,384 when resampling is on)
    dead_fraction: float = 0.0  # AuxK: fraction of latents dead (their rows are copied each step)

    def __post_init__(self):
        for name in ("d_in", "d_sae", "k", "batch", "gpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        shards = self.shards
        if self.gpus % shards:
            raise ValueError(f"latent_shards ({shards}) must divide gpus ({self.gpus})")
        if self.batch % self.data:
            raise ValueError(f"batch ({self.batch}) must divide over the {self.data} data replicas")
        for name in ("weights", "compute", "moments"):
            if getattr(self, name) not in BYTES:
                raise ValueError(f"{name} must be one of {tuple(BYTES)}, got {getattr(self, name)!r}")
        if self.backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {self.backend!r}")
        if self.optimizer not in ("fused", "torch"):
            raise ValueError(f"optimizer must be 'fused' or 'torch', got {self.optimizer!r}")
        if self.activation not in ("topk", "batchtopk", "relu", "jumprelu"):
            raise ValueError(f"activation must be topk, batchtopk, relu or jumprelu, got {self.activation!r}")
        if not 0.0 <= self.dead_fraction <= 1.0:
            raise ValueError(f"dead_fraction must be in [0, 1], got {self.dead_fraction}")

    @property
    def shards(self) -> int:
        return self.gpus if self.latent_shards is None else self.latent_shards

    @property
    def data(self) -> int:
        return self.gpus // self.shards


@dataclass
class MemoryPlan:
    cfg: PlanConfig
    latents_per_rank: int
    rows_per_rank: int
    terms: dict[str, int]  # persistent terms and the transient peak, bytes

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def _encoder_splits(rows: int, n: int, sms: int = DEFAULT_SMS) -> int:
    """How many latent slices the fused encoder's grid has (kernels/_common.py encoder_grid)."""
    tiles = math.ceil(n / ENCODER_BLOCK_N)
    return min(tiles, max(1, math.ceil(PROGRAMS_PER_SM * sms / math.ceil(rows / ENCODER_BLOCK_M))))


def plan(cfg: PlanConfig) -> MemoryPlan:
    """Per-rank bytes of a training step under cfg (see the module docstring for the model)."""
    n, b, d, k = math.ceil(cfg.d_sae / cfg.shards), cfg.batch // cfg.data, cfg.d_in, cfg.k
    w, m_bytes = BYTES[cfg.weights], BYTES[cfg.moments]
    mixed = cfg.compute != cfg.weights
    c = BYTES[cfg.compute]
    mats = 1 if cfg.tied else 2
    params = mats * n * d + n + d
    dead = math.ceil(cfg.dead_fraction * n)
    terms = {
        "weights": params * w,
        "gradients": params * w,
        "optimizer state": 2 * params * m_bytes,
        "training state": 8 * n + cfg.resample_pool * d * w,
        "compute copies": mats * n * d * c if mixed else 0,
    }
    # Activations that live from the forward through the backward: the batch, its centred copy (kept by
    # the encoder's backward), x_hat and the fp32 residual the loss keeps, and the latents (merged ones too).
    act = b * d * (3 * c + 4) + 24 * b * k
    if cfg.shards > 1:  # the gathered candidates (fp32 value + int32 index, packed and unpacked) and fp32 x_hat
        act += 16 * b * k * cfg.shards + 4 * b * d
    if dead:  # AuxK: copies of the dead rows of W_enc (and of b_enc), their top-k and decode
        act += mats * dead * d * c + 24 * b * k + 4 * b * d
    terms["activations"] = act
    # Transients: the largest of the forward's, the backward's and the optimizer's workspace.
    # The backward's: gradients of x_hat, the residual, the encoder input and x (fp32, b·d each), and
    # the latent sort of the segment reductions (~40 bytes per selected entry).
    backward = 5 * b * d * 4 + 40 * b * k
    if cfg.backend == "triton":
        k_pad = 2 ** math.ceil(math.log2(max(1, k)))
        forward = 8 * b * _encoder_splits(b, n) * k_pad  # the fused encoder's per-slice candidates
        backward += 16 * (n + 2)  # segment offsets
    else:
        forward = b * n * c + (b * dead * c if dead else 0)  # the dense pre-activations
        # the segment offsets and the bias gradient (the sparse reductions are embedding_bag calls that
        # write only their outputs: ops/torch_backend.py)
        backward += 12 * (n + 1)
    if mixed:
        backward += n * d * 4  # one fp32 weight gradient before its cast to the compute dtype
    if cfg.data > 1 and cfg.backend == "torch":
        # gloo's all-reduce of a gradient holds a receive buffer of its size while the backward goes on
        # (measured: bench/plan_check.py); NCCL reduces through fixed buffers of a few MiB (the reserve).
        backward += n * d * w
    opt = 3 * n * d * 4 if cfg.optimizer == "torch" else 0  # torch's Adam: 3 temporaries (measured)
    terms["workspace (largest transient)"] = max(forward, backward, opt)
    if cfg.backend == "triton":
        persistent = sum(terms.values())
        terms["CUDA context + allocator slack"] = CUDA_RESERVE_BYTES + int(CUDA_SLACK * persistent)
    return MemoryPlan(cfg, n, b, terms)


def comm_per_step(cfg: PlanConfig) -> dict[str, int]:
    """Bytes one rank sends per training step (metrics steps aside), for ring collectives as gloo and
    NCCL run them: an all-reduce sends 2(p-1)/p of its payload, an all-gather (p-1) times its part.

    data group (p = data replicas):   the gradients (master dtype); which latents fired (a byte each);
                                      the batch's rows for the resampling pool, when resampling
    latent group (p = latent shards): the top-k candidates (fp32 value + int32 index per slot), the
                                      fp32 partial x_hat, b_dec's encoder gradient; relu/jumprelu and
                                      BatchTopK instead gather their active latents (~k per row)
    every rank (BatchTopK):           its top batch·k activations, for the threshold
    """
    n, b, d, k = math.ceil(cfg.d_sae / cfg.shards), cfg.batch // cfg.data, cfg.d_in, cfg.k
    D, L, G = cfg.data, cfg.shards, cfg.gpus
    w = BYTES[cfg.weights]
    params = (1 if cfg.tied else 2) * n * d + n + d
    out: dict[str, int] = {}
    if D > 1:
        out["gradients all-reduce (data)"] = round(2 * (D - 1) / D * params * w)
        out["fired latents all-reduce (data)"] = round(2 * (D - 1) / D * n)
        if cfg.resample_pool:
            out["pool rows all-gather (data)"] = (D - 1) * b * d * w
    if L > 1:
        out["candidates all-gather (latent)"] = (L - 1) * b * k * 8
        out["x_hat all-reduce (latent)"] = round(2 * (L - 1) / L * b * d * 4)
        out["b_dec gradient all-reduce (latent)"] = round(2 * (L - 1) / L * d * w)
    if cfg.activation == "batchtopk" and G > 1:
        out["threshold all-gather (all)"] = (G - 1) * cfg.batch * k * 4
    return out


def largest_d_sae(cfg: PlanConfig, budget_bytes: float) -> int:
    """The largest d_sae (a multiple of the latent shards) whose plan fits budget_bytes; 0 if none does.
    The plan is affine in d_sae past the point where the per-latent terms dominate, so two evaluations
    give the slope and a short walk settles the rounding."""
    def total(d_sae: int) -> int:
        return plan(dataclasses.replace(cfg, d_sae=d_sae, k=min(cfg.k, d_sae))).total

    step = cfg.shards
    lo, hi = step * 1024, step * 2048
    slope = (total(hi) - total(lo)) / (hi - lo)
    guess = max(step, int((budget_bytes - total(lo)) / slope + lo) // step * step)
    while guess > step and total(guess) > budget_bytes:
        guess -= step * max(1, guess // (step * 1000))
    while total(guess + step) <= budget_bytes:
        guess += step
    return guess if total(guess) <= budget_bytes else 0


def report(cfg: PlanConfig, gpu_memory_gib: float) -> str:
    """The planner's printout: per-rank memory for fp32 and bf16 Adam moments, and the largest d_sae."""
    plans = {m: plan(dataclasses.replace(cfg, moments=m)) for m in ("float32", "bfloat16")}
    first = plans["float32"]
    budget = gpu_memory_gib * GIB
    lines = [f"fastsae plan: d_in {cfg.d_in:,}, d_sae {cfg.d_sae:,}, k {cfg.k}, batch {cfg.batch:,} rows, "
             f"{cfg.gpus} GPU(s) x {gpu_memory_gib:g} GiB",
             f"layout: {cfg.shards} latent shard(s) x {cfg.data} data replica(s): {first.latents_per_rank:,} "
             f"latents and {first.rows_per_rank:,} rows per rank; {cfg.weights} master weights, {cfg.compute} "
             f"compute, backend {cfg.backend}, optimizer {cfg.optimizer}", "",
             f"{'per rank':34}{'fp32 moments':>14}{'bf16 moments':>14}"]
    for term in first.terms:
        a, b = first.terms[term], plans["bfloat16"].terms[term]
        lines.append(f"  {term:32}{a / GIB:>10.2f} GiB{b / GIB:>10.2f} GiB")
    lines.append(f"  {'total':32}{first.total / GIB:>10.2f} GiB{plans['bfloat16'].total / GIB:>10.2f} GiB")
    lines.append(f"  {'fits in ' + format(gpu_memory_gib, 'g') + ' GiB':32}"
                 + "".join(f"{'yes' if p.total <= budget else 'NO':>14}" for p in plans.values()))
    comm = comm_per_step(cfg)
    if comm:
        lines += ["", "sent per step and rank (ring collectives)"]
        lines += [f"  {name:32}{v / 2**20:>10.2f} MiB" for name, v in comm.items()]
        lines.append(f"  {'total':32}{sum(comm.values()) / 2**20:>10.2f} MiB")
    lines.append("")
    for moments, p in plans.items():
        top = largest_d_sae(p.cfg, budget)
        pow2 = 2 ** int(math.log2(top)) if top else 0
        lines.append(f"largest d_sae that fits ({moments} moments): {top:,} (power of two: {pow2:,})")
    return "\n".join(lines)
