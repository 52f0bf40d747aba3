"""Collectives for training past one device: the process grid and the latent-sharded SAE ops.

Everything here is `torch.distributed` (launched by torchrun; NCCL on GPUs, gloo on CPU). The kernels
never communicate: each rank runs the ordinary backend ops on what it holds, and the few collectives
below join the results.

The process grid is data × latent, rank = data_rank · latent_size + latent_rank, so that the ranks that
talk on every forward (one latent group) are neighbours — on one node when latent_size divides the
GPUs per node:
- a latent group holds one batch; each of its ranks owns a contiguous slice of the d_sae latents
  (rows of W_enc, W_dec, b_enc and their optimizer state);
- a data group holds one latent slice; its ranks see different rows of the global batch and average
  their gradients (train/distributed.py).

Latent sharding is tensor parallelism over d_sae in the manner of Megatron-LM (Shoeybi et al. 2019,
its f and g operators: `replicate` and `sum_shards` here):
  encode  every rank runs the backend's encoder on its slice (the fused kernel on CUDA) and keeps each
          row's top-k candidates; one all-gather brings every rank's candidates and the merge is the
          single-device one, `torch.topk` over the candidates, as kernels/encoder_topk.py merges its
          slices. Indices therefore equal the unsharded ones.
  decode  each rank sums the decoder rows of the selected latents it owns; one all-reduce adds the
          partial reconstructions. The loss is then the same on every rank, so dL/dx_hat is too and the
          decoder's backward needs no communication; nor does the encoder's, for its own rows.
  b_dec   is replicated, and the encoder input x - b_dec feeds every slice: its encoder gradient is the
          sum over the latent group, d_in floats all-reduced in the backward (`replicate`).
BatchTopK's threshold τ (the (N·k)-th largest activation of the whole batch) comes from one all-gather
of every rank's own top N·k values over all ranks (`batch_threshold`): each rank's block of the
(rows × latents) matrix holds all its members of the global top N·k among its own top N·k.

A group of one rank is `None` here and every collective on it is a no-op, so the same code runs in a
single process without `torch.distributed` initialised. `COMM` counts the bytes each rank hands to
collectives (bench/distributed.py reports it beside the computed volume).
"""

from __future__ import annotations

import atexit
import os
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from . import backend_for

# Bytes (and calls) this rank handed to collectives, by name: bench/distributed.py reads and resets it.
COMM: Counter = Counter()
# Seconds a collective may wait for a peer before the job fails (a dead peer usually fails it at once,
# through its closed socket; this bounds a hung one). torch's default is 30 minutes.
DEFAULT_TIMEOUT_S = 300
_ENV_TIMEOUT = "FASTSAE_DIST_TIMEOUT"


# ---- launching --------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or any launcher setting RANK and WORLD_SIZE) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(timeout_s: float | None = None) -> torch.device:
    """Join the job that torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL with one GPU per rank (cuda:LOCAL_RANK) when CUDA is available,
    gloo on CPU otherwise. Returns this rank's device. Idempotent."""
    if not launched_by_torchrun():
        raise RuntimeError("init_from_env: RANK and WORLD_SIZE are not set; launch with "
                           "`torchrun --nproc-per-node N -m fastsae ...`")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timeout_s if timeout_s is not None else float(os.environ.get(_ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout),
                                device_id=device if cuda else None)
        atexit.register(_leave)
    return device


def leave() -> None:
    """End this rank's part in the job after its work succeeded: wait for every rank (gloo aborts the
    process with "terminate called without an active exception" when one rank tears its connections down
    while a peer is still using them), then destroy the process group. A no-op without one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _leave() -> None:
    """At exit after a failure: destroy what is left, without waiting on peers that may be gone."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the grid ---------------------------------------------------------------------------------------


def latent_bounds(d_sae: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of d_sae latents over shards, the first d_sae % shards one larger."""
    if shards < 1 or d_sae < shards:
        raise ValueError(f"need 1 <= shards <= d_sae, got shards={shards} for d_sae={d_sae}")
    base, extra = divmod(d_sae, shards)
    bounds, start = [], 0
    for r in range(shards):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class ProcessGrid:
    """This rank's place in the data × latent grid, and its groups (None where a group has one rank)."""

    data_size: int = 1
    latent_size: int = 1
    data_rank: int = 0
    latent_rank: int = 0
    data_group: object = None  # the ranks holding this latent slice: gradient averaging
    latent_group: object = None  # the ranks holding this batch: candidate merge and decode sums
    batch_group: object = None  # every rank: BatchTopK's threshold over the whole batch

    @property
    def world_size(self) -> int:
        return self.data_size * self.latent_size

    @property
    def rank(self) -> int:
        return self.data_rank * self.latent_size + self.latent_rank

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics and the files every rank shares."""
        return self.rank == 0

    @classmethod
    def create(cls, latent_size: int = 1) -> ProcessGrid:
        """The grid over the initialised default group: world_size / latent_size data replicas of
        latent_size shards. Every rank must call this, with the same latent_size."""
        if not dist.is_initialized():
            return cls() if latent_size == 1 else _refuse_latent(latent_size)
        world, rank = dist.get_world_size(), dist.get_rank()
        if latent_size < 1 or world % latent_size:
            raise ValueError(f"latent shards ({latent_size}) must divide the world size ({world})")
        data_size = world // latent_size
        data_rank, latent_rank = divmod(rank, latent_size)
        whole = dist.group.WORLD if world > 1 else None
        # new_group is collective: every rank creates every group, in the same order.
        latent_group = data_group = None
        if latent_size == world:
            latent_group = whole
        elif latent_size > 1:
            for d in range(data_size):
                g = dist.new_group(list(range(d * latent_size, (d + 1) * latent_size)))
                latent_group = g if d == data_rank else latent_group
        if data_size == world:
            data_group = whole
        elif data_size > 1:
            for s in range(latent_size):
                g = dist.new_group(list(range(s, world, latent_size)))
                data_group = g if s == latent_rank else data_group
        return cls(data_size, latent_size, data_rank, latent_rank, data_group, latent_group, whole)


def _refuse_latent(latent_size: int):
    raise RuntimeError(f"{latent_size} latent shards need torch.distributed: launch with torchrun")


@dataclass(frozen=True)
class LatentShard:
    """Rows start:stop of the d_sae latents, held by this rank of its latent group."""

    d_sae: int
    start: int
    stop: int
    group: object = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    @classmethod
    def of(cls, d_sae: int, grid: ProcessGrid) -> LatentShard:
        start, stop = latent_bounds(d_sae, grid.latent_size)[grid.latent_rank]
        return cls(d_sae, start, stop, grid.latent_group)


# ---- counted collectives ----------------------------------------------------------------------------


def count_bytes(name: str, t: Tensor) -> None:
    """Record that this rank hands t to a collective called name (COMM)."""
    COMM[name] += t.numel() * t.element_size()
    COMM[f"{name}:calls"] += 1


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_(t: Tensor, group, op=dist.ReduceOp.SUM, name: str = "all_reduce") -> Tensor:
    """In-place all-reduce over group (a no-op for None)."""
    if group is not None:
        count_bytes(name, t)
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather(t: Tensor, group, name: str = "all_gather") -> Tensor:
    """(size · t.shape[0], *t.shape[1:]) : every rank's t, stacked in rank order along dim 0."""
    if group is None:
        return t
    t = t.contiguous()
    out = t.new_empty(group_size(group) * t.shape[0], *t.shape[1:])
    count_bytes(name, t)
    # all_gather_single is torch >= 2.12's name for all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    gather(out, t, group=group)
    return out


def broadcast_(t: Tensor, group, name: str = "broadcast") -> Tensor:
    """In-place: the group's first rank's t on every rank of group."""
    if group is not None:
        count_bytes(name, t)
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return t


# ---- autograd across the latent group ---------------------------------------------------------------


class _Replicate(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (Megatron's f)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce_(grad.contiguous().clone(), ctx.group, name="grad_all_reduce"), None


class _SumShards(torch.autograd.Function):
    """All-reduce forward; identity backward, since every rank computes the same loss from the sum (g)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        return all_reduce_(t.contiguous().clone(), group, name="decode_all_reduce")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherCandidates(torch.autograd.Function):
    """Every rank's (N, c) candidate values and int64 indices → (N, size · c) each, rank-major in a row. One
    all-gather: the indices travel as int32 bits beside fp32 values (int64 beside float64 ones, the tests' reference
    copies). The backward hands each rank the gradient of its own candidates, with no communication."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, group) -> tuple[Tensor, Tensor]:
        n, c = values.shape
        fdt, idt = (torch.float64, torch.int64) if values.dtype == torch.float64 else (torch.float32, torch.int32)
        packed = torch.cat([values.to(fdt), indices.to(idt).view(fdt)], dim=1)  # (N, 2c)
        out = all_gather(packed, group, name="candidates_all_gather").view(-1, n, 2 * c).transpose(0, 1)
        size = out.shape[1]
        cand_values = out[..., :c].reshape(n, size * c).to(values.dtype)
        cand_indices = out[..., c:].contiguous().view(idt).reshape(n, size * c).long()
        ctx.mark_non_differentiable(cand_indices)
        ctx.rank, ctx.c = group_rank(group), c
        return cand_values, cand_indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):
        lo = ctx.rank * ctx.c
        return grad_values[:, lo:lo + ctx.c], None, None


def replicate(t: Tensor, group) -> Tensor:
    """t as the input of every shard's computation: its gradient is summed over the group."""
    return t if group is None or not t.requires_grad else _Replicate.apply(t, group)


def sum_shards(t: Tensor, group) -> Tensor:
    """Σ over the group of each rank's partial t; the gradient passes through to every rank's part."""
    return t if group is None else _SumShards.apply(t, group)


# ---- sharded encoders -------------------------------------------------------------------------------


def merge_candidates(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's top-k of its candidates: the single-device merge (kernels/encoder_topk.py)."""
    top, slot = torch.topk(values, k, dim=1)
    return top, indices.gather(1, slot)


def encode_topk(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, shard: LatentShard,
                latent_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each row's top-k over the latents of every rank of shard.group.

    x_c (N, d_in), already centred (and `replicate`d); W_enc (n, d_in), b_enc (n,) this rank's rows,
    whose global latent ids are latent_ids (n,) (default shard.start + arange(n)); n may be 0.
    → values (N, k) differentiable, indices (N, k) int64 global, the same on every rank."""
    ops = backend_for(x_c.device)
    n_rows, n = x_c.shape[0], W_enc.shape[0]
    c = min(k, n)
    if c:
        values, local = ops.encode_topk(x_c, W_enc, b_enc, c)  # (N, c)
        indices = local + shard.start if latent_ids is None else latent_ids[local]
    else:  # nothing here to offer; still tied to x_c so every rank runs the same backward collectives
        values = (x_c[:, :1] * 0).expand(n_rows, 0).to(W_enc.dtype)
        indices = torch.zeros(n_rows, 0, dtype=torch.int64, device=x_c.device)
    if shard.group is None:
        return values, indices
    if c < k:  # fixed-size candidates for the all-gather: value -1 never beats a real (>= 0) one
        pad = k - c
        values = torch.cat([values, (x_c[:, :1] * 0).to(values.dtype).expand(n_rows, pad) - 1], dim=1)
        indices = torch.cat([indices, indices.new_zeros(n_rows, pad)], dim=1)
    cand_values, cand_indices = _GatherCandidates.apply(values, indices, shard.group)
    return merge_candidates(cand_values, cand_indices, k)


def batch_threshold(values: Tensor, count: int, group) -> Tensor:
    """The count-th largest of the union over group of every rank's values (any shape, >= 0).
    Each rank sends only its own top count values (zeros where it has fewer)."""
    flat = values.detach().reshape(-1).to(torch.promote_types(values.dtype, torch.float32))  # float64 stays
    top = torch.topk(flat, min(count, flat.numel())).values
    if top.numel() < count:
        top = torch.cat([top, top.new_zeros(count - top.numel())])
    return torch.topk(all_gather(top, group, name="threshold_all_gather"), count).values[-1]


def encode_batchtopk(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, shard: LatentShard, batch_group,
                     rows_total: int) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK over the whole batch (rows_total rows on every rank of batch_group, all latents):
    active iff relu(pre) >= τ and > 0, τ the (rows_total·k)-th largest relu(pre) of the batch.
    → this rank's latents in compact form: values (N, w) differentiable, global indices (N, w), τ fp32."""
    ops = backend_for(x_c.device)
    need = rows_total * k
    # This block's top `need` holds every one of its entries in the global top `need`.
    values, local, _ = ops.encode_batchtopk(x_c, W_enc, b_enc, -(-need // x_c.shape[0]))
    tau = batch_threshold(values, need, batch_group)
    keep = (values >= tau.to(values.dtype)) & (values > 0)
    return values * keep, local + shard.start, tau.float()


def encode_threshold(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None,
                     shard: LatentShard) -> tuple[Tensor, Tensor]:
    """ReLU (threshold None) or JumpReLU over this rank's latents: compact values (N, w), global indices."""
    values, local = backend_for(x_c.device).encode_threshold(x_c, W_enc, b_enc, threshold)
    return values, local + shard.start


def gather_compact(values: Tensor, indices: Tensor, group) -> tuple[Tensor, Tensor]:
    """Every rank's compact latents of the same rows, joined into one compact form (detached):
    (N, w_r) per rank → (N, w) with w the largest row total. Two collectives (the width, then the rows)."""
    values = values.detach()
    if group is None:
        return values, indices
    n = values.shape[0]
    width = all_reduce_(torch.tensor([values.shape[1]], device=values.device), group, dist.ReduceOp.MAX,
                        name="width_all_reduce")
    pad = int(width) - values.shape[1]
    values = torch.cat([values, values.new_zeros(n, pad)], 1)
    indices = torch.cat([indices, indices.new_zeros(n, pad)], 1)
    all_values, all_indices = _GatherCandidates.apply(values, indices, group)
    w = max(1, int((all_values > 0).sum(1).max()))
    return merge_candidates(all_values, all_indices, w)


# ---- sharded decode ---------------------------------------------------------------------------------


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, shard: LatentShard) -> Tensor:
    """x_hat (N, d_in) = Σ over the latent group of each rank's Σ_j v[n, j] · W_dec[idx[n, j]] over the
    entries it owns, + b_dec. values/indices (N, w) may hold other ranks' entries (they are skipped).
    The partial sums travel in fp32 (fp64 for float64), so bf16 compute rounds once, as on one device."""
    ops = backend_for(values.device)
    no_bias = torch.zeros(W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    if shard.group is None:  # every latent is here: the single-device decode
        return ops.decode(values, indices - shard.start, W_dec, no_bias if b_dec is None else b_dec)
    own = (indices >= shard.start) & (indices < shard.stop)
    local = torch.where(own, indices - shard.start, torch.zeros_like(indices))
    partial = ops.decode(values * own, local, W_dec, no_bias)  # (N, d_in)
    acc = torch.promote_types(partial.dtype, torch.float32)  # fp32, fp64 for float64
    x_hat = sum_shards(partial.to(acc), shard.group)
    x_hat = x_hat if b_dec is None else x_hat + b_dec.to(acc)
    return x_hat.to(values.dtype)
