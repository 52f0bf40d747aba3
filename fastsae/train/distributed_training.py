"""Training on several ranks (torchrun): data parallel, latent sharding, and both on a 2-D grid.

    torchrun --nproc-per-node 8 -m fastsae train --data STORE ...                      # 8 data replicas
    torchrun --nproc-per-node 8 -m fastsae train --data STORE ... --shard-latents      # 8 latent shards
    torchrun --nproc-per-node 8 -m fastsae train --data STORE ... --latent-shards 4    # 2 replicas x 4 shards

`DistributedTrainer` is the `Trainer` with its seams filled in for a `ProcessGrid` of data replicas ×
latent shards (`fastsae.ops.distributed`); the model is a `ShardedSAE` (one shard: every latent).

Supported: every grid data × latent = world size (latent shards dividing the world size, d_sae >= the
shard count, the batch divisible by the data replicas); every activation, tied or not, AuxK, resampling,
mixed precision and both optimizers; every kind: SAEs, transcoders and skip transcoders (a replicated W_skip,
averaged over the data group as any parameter), JumpReLU with θ trained, Matryoshka SAEs and crosscoders
(train/sharded.py; `ShuffledLoader(sites=)` serves each data rank every site's rows of its part).
Not supported: KL training (`SpliceKL`, one process only).

Data parallel. Each rank gets its tensor_split part of the global batch (`ShuffledLoader(rank=,
world_size=)`, or `slice_batches` over any batch source), so the ranks' batches of a step join into the
single-process batch. Gradients are averaged over the data group by an explicit all-reduce per
parameter, launched from a post-accumulate-grad hook as soon as that gradient is complete (so the
decoder's overlaps the encoder's backward, as DDP's buckets would) and waited for before the optimizer.
bench/distributed.py measures it against DistributedDataParallel: no difference outside the noise on
CPU/gloo, and this keeps one code path for both grid axes with no wrapper around the model. The
BatchTopK threshold is taken over the whole batch (ops.distributed.batch_threshold). Which latents fired
is OR-reduced over the data group (one byte per latent), so dead-latent counts — and AuxK, and
resampling — are those of the whole batch; the resampling pool keeps every rank's rows (an all-gather
of each batch while resampling is on), so resampling draws from the single-process pool, with the
same generator state on every rank, and decides the same everywhere. Logged metrics are the whole
batch's.

Files. Rank 0 writes metrics and progress. With one latent shard a checkpoint is the single-process
checkpoint, byte for byte the format `Trainer` writes; with several it is a sharded directory
(train/sharded.py) whose shard files also hold each rank's rows of the Adam moments and dead-latent
counters, and whose replicated file holds the rest of the trainer state. Either resumes on any grid
(it reshards: the data order is global and every tensor is read by latent rows), so a run may move to
more or fewer GPUs, or to one process: `load_training_state` reads either format into a
DistributedTrainer (its rows) or a plain Trainer (every row; `Trainer.load_checkpoint` hands a sharded
checkpoint to it), and `read_checkpoint_meta` gives either format's step and length (`fastsae train
--resume --steps N` checks N against it); both are in train/checkpoint_loading.py. On the same grid a
resumed run ends bit for bit where an uninterrupted one ends; on another, where an uninterrupted run on
the new grid would, to fp32 rounding (the reductions add in another order). tests/train/test_sharded_resume.py
kills a rank of a torchrun job and resumes it each way.

Failure: a rank that dies fails its peers' next collective at once (their sockets close), and every
collective has the process group's timeout (ops.distributed.DEFAULT_TIMEOUT_S, $FASTSAE_DIST_TIMEOUT)
for a rank that hangs; torchrun then stops the job, and `--resume` continues from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..losses import variance_unexplained
from ..ops import backend_for
from ..ops import distributed as D
from ..ops.distributed import ProcessGrid
from ..sae import SAE
from . import checkpoint as ckpt
from .checkpoint_loading import OPTIM_PREFIX, load_training_state
from .resample import ENCODER_SCALE, adam_state_rows, draw_inputs, reconstruction_losses
from .sharded import ShardedSAE, consolidate, gather_rows, write_sharded
from .train_config import TrainConfig
from .trainer import Trainer


class _Sliced:
    """A batch source's batches, each cut to this data rank's part (and moved to device), keeping len(). A
    transcoder's (x, y) pair is cut alike, so each rank keeps the same tokens of both sites."""

    def __init__(self, batches, grid: ProcessGrid, device: torch.device | str | None):
        self.batches, self.grid, self.device = batches, grid, device

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.batches:
            if isinstance(batch, (tuple, list)):
                yield tuple(self._part(t) for t in batch)
            else:
                yield self._part(batch)

    def _part(self, batch: Tensor) -> Tensor:
        part = batch.tensor_split(self.grid.data_size)[self.grid.data_rank]
        return part if self.device is None else part.to(self.device)

    def __len__(self) -> int:
        return len(self.batches)


def slice_batches(batches: Iterable[Tensor], grid: ProcessGrid, device: torch.device | str | None = None):
    """This data rank's tensor_split part of every global batch of any batch source: each rank builds the
    whole batch and keeps its part (`ShuffledLoader(rank=, world_size=)` reads only its part instead)."""
    return batches if grid.data_size == 1 and device is None else _Sliced(batches, grid, device)


class DistributedTrainer(Trainer):
    def __init__(self, model: ShardedSAE, cfg: TrainConfig | None = None, run_dir: str | Path | None = None):
        if not isinstance(model, ShardedSAE):
            raise TypeError(f"DistributedTrainer trains a ShardedSAE (ShardedSAE.from_sae(sae, grid)), "
                            f"got {type(model).__name__}")
        super().__init__(model, cfg, run_dir)
        self.grid = model.grid
        self.is_main = self.grid.is_main
        self.tokens_since_fired = torch.zeros(model.shard.size, dtype=torch.int64, device=model.device)
        self._pending: list[tuple[Tensor, object]] = []
        if self.grid.data_size > 1:
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._launch_all_reduce)

    @property
    def model(self) -> ShardedSAE:
        return self.sae

    # ---- data parallel ---------------------------------------------------------------------------

    def _launch_all_reduce(self, p: Tensor) -> None:
        D.count_bytes("grad_all_reduce", p.grad)
        self._pending.append((p.grad, dist.all_reduce(p.grad, group=self.grid.data_group, async_op=True)))

    def _after_backward(self) -> None:
        for grad, work in self._pending:
            work.wait()
            grad.div_(self.grid.data_size)
        self._pending.clear()

    def _global_rows(self, rows: int) -> int:
        return rows * self.grid.data_size

    def _fired(self, latents) -> Tensor:
        s = self.model.shard
        idx = latents.indices[latents.active]
        own = idx[(idx >= s.start) & (idx < s.stop)] - s.start
        fired = torch.zeros(s.size, dtype=torch.uint8, device=idx.device)
        fired[own] = 1
        return D.all_reduce_(fired, self.grid.data_group, dist.ReduceOp.MAX, name="fired_all_reduce").bool()

    def _rows_mean(self, rows: Tensor) -> Tensor:
        sums = D.all_reduce_(rows.double().sum(0), self.grid.data_group, name="mean_all_reduce")
        return sums / self._global_rows(rows.shape[0])

    def _pool_rows(self, rows: Tensor) -> Tensor:
        return D.all_gather(rows.contiguous(), self.grid.data_group, name="pool_all_gather")

    def _batch_means(self, values: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        present = [name for name, t in values.items() if t is not None]
        stacked = torch.stack([values[name].detach().double() for name in present])
        stacked = D.all_reduce_(stacked, self.grid.data_group, name="metrics_all_reduce") / self.grid.data_size
        return {**values, **dict(zip(present, stacked, strict=True))}

    def _fvu(self, x: Tensor, x_hat: Tensor) -> float:
        """fvu over the whole batch, from the float64 sums every rank adds up (losses.variance_unexplained)."""
        if self.grid.data_size == 1:
            return super()._fvu(x, x_hat)
        x, x_hat = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x.shape[-1]).double()
        sums = torch.cat([(x - x_hat).square().sum().view(1), x.square().sum().view(1), x.sum(0)])
        sums = D.all_reduce_(sums, self.grid.data_group, name="metrics_all_reduce")
        return variance_unexplained(float(sums[0]), float(sums[1]), sums[2:], self._global_rows(x.shape[0]))

    # ---- latent sharding -------------------------------------------------------------------------

    def dead_fraction(self) -> float:
        if self.tokens_seen < self.cfg.dead_latents.window_tokens:
            return 0.0
        dead = self.dead_mask().sum().view(1)
        return float(D.all_reduce_(dead, self.model.shard.group, name="metrics_all_reduce")) / self.model.cfg.d_sae

    def _resample(self, dead: Tensor) -> int:
        return resample_sharded(self.model, dead, self.pool, self.optimizer, self.generator)

    # ---- checkpoints -----------------------------------------------------------------------------

    def _checkpoint_sae(self) -> SAE:
        return self.model.to_sae()

    def save_checkpoint(self) -> Path:
        """Collective. One latent shard: rank 0 writes the single-process checkpoint. Several: every
        shard's first data rank writes its rows into the checkpoint rank 0 commits."""
        if self.grid.latent_size == 1:
            path = super().save_checkpoint() if self.is_main else None
        elif self.is_main:
            path = ckpt.write_checkpoint(self.run_dir, self.step_count, self._write_shards,
                                         keep=self.cfg.checkpoints.keep)
        else:
            self._write_shards(None)
            path = None
        return _broadcast_path(path)

    def _write_shards(self, tmp: Path | None) -> None:
        tmp = _broadcast_path(tmp)
        rows, replicated = self._state_tensors()
        extra = {"step": self.step_count, "tokens": self.tokens_seen, "total_steps": self.total_steps,
                 "config": self.cfg.to_dict(), "optimizer": self._optimizer_meta(),
                 "grid": {"data": self.grid.data_size, "latent": self.grid.latent_size}}
        write_sharded(tmp, self.model.cfg, self.grid, rows, replicated, self.model.metadata, extra)

    def _named_state(self) -> dict[str, dict]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: self.optimizer.state[p] for group in self.optimizer.param_groups
                for p in group["params"] if self.optimizer.state.get(p)}

    def _optimizer_meta(self) -> dict:
        sd = self.optimizer.state_dict()
        scalars = {f"{name}.{key}": v for name, state in self._named_state().items() for key, v in state.items()
                   if not isinstance(v, Tensor)}
        return {"param_groups": sd["param_groups"], "scalars": scalars}

    def _state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(this rank's rows of every per-latent tensor, the replicated rest) of the whole training state."""
        model = self.model
        rows = {**model.row_state(), "tokens_since_fired": self.tokens_since_fired}
        replicated = {**model.replicated_state(), "pool": self.pool, "generator": self.generator.get_state(),
                      "torch_rng": torch.get_rng_state()}
        for name, state in self._named_state().items():
            for key, t in state.items():
                if isinstance(t, Tensor):
                    target = rows if name in model.row_tensors and t.dim() > 0 else replicated
                    target[f"{OPTIM_PREFIX}{name}.{key}"] = t
        return rows, replicated

    def load_checkpoint(self, path: Path) -> None:
        """A sharded or single-process checkpoint, written on any grid: this rank's rows of it."""
        load_training_state(self, path)

    def resume(self) -> bool:
        """Collective: the newest intact checkpoint (rank 0 finds and verifies it, and tidies metrics.jsonl)."""
        path = None
        if self.is_main and self.run_dir is not None:
            path = ckpt.resume_checkpoint(self.run_dir)
        path = _broadcast_path(path)
        if path is None:
            return False
        self.load_checkpoint(path)
        if self.is_main:
            ckpt.truncate_metrics(self.run_dir / "metrics.jsonl", self.step_count)
        return True

    def fit(self, batches: Iterable[Tensor], resume: bool = False):
        """`Trainer.fit`; rank 0 alone holds the run directory's writer lock and tidies what killed writers
        left there (before any rank reads a checkpoint: they wait for rank 0's resume)."""
        if self.is_main:
            return super().fit(batches, resume)
        self.sae.compute_dtype = self._train_compute_dtype
        try:
            return self._fit(batches, resume)
        finally:
            self.sae.compute_dtype = self._caller_compute_dtype


def _broadcast_path(path: Path | None) -> Path | None:
    """Rank 0's path on every rank (torch.distributed's object broadcast; a no-op in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return path
    box = [None if path is None else str(path)]
    dist.broadcast_object_list(box, src=0)
    return None if box[0] is None else Path(box[0])


@torch.no_grad()
def resample_sharded(model: ShardedSAE, dead: Tensor, pool: Tensor, optimizer: torch.optim.Optimizer | None,
                     generator: torch.Generator | None) -> int:
    """`resample_dead_latents` with the latents spread over the latent group: the dead masks and the
    alive encoder norms are reduced, the pool's losses come from the sharded forward (the same on every
    rank), every rank draws the same inputs for the same global dead latents with its copy of the one
    generator, and each rewrites its own rows. Returns how many latents were resampled in all."""
    s = model.shard
    if dead.shape != (s.size,) or dead.dtype != torch.bool:
        raise ValueError(f"dead must be a bool tensor of this rank's ({s.size},) latents, got "
                         f"{dead.dtype} {tuple(dead.shape)}")
    latents = gather_rows(dead.to(torch.uint8), s).bool().nonzero().squeeze(1)  # global ids, ascending
    n = latents.numel()
    if n == 0:
        return 0
    picks = draw_inputs(reconstruction_losses(model, pool), n, generator)
    mine = (latents >= s.start) & (latents < s.stop)
    alive = ~dead
    norms = torch.stack([model.W_enc[alive].double().norm(dim=1).sum(), alive.sum().double()])
    norms = D.all_reduce_(norms, s.group, name="resample_all_reduce")
    alive_norm = float(norms[0] / norms[1]) if norms[1] > 0 else 1.0
    if mine.any():
        inputs = pool[picks[mine]].float()
        directions = inputs / inputs.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        W_enc = None if model.cfg.tied else model.W_enc.data
        backend_for(model.device).resample_rows(latents[mine] - s.start, directions, model.W_dec.data, W_enc,
                                                model.b_enc.data, ENCODER_SCALE * alive_norm,
                                                adam_state_rows(optimizer, model))
    return n


# ---- the command line's pieces ----------------------------------------------------------------------


def setup(shard_latents: int | None = None) -> tuple[ProcessGrid, torch.device]:
    """Join the torchrun job (ops.distributed.init_from_env) and lay out its grid: shard_latents None
    → every rank a data replica; 0 → every rank a latent shard; N → N shards × world/N replicas."""
    device = D.init_from_env()
    world = dist.get_world_size()
    latent = 1 if shard_latents is None else (world if shard_latents == 0 else shard_latents)
    if latent < 1 or world % latent:
        raise ValueError(f"--shard-latents {latent} must divide the number of processes ({world})")
    return ProcessGrid.create(latent), device


def check_batch(batch_size: int, grid: ProcessGrid) -> None:
    if batch_size % grid.data_size:
        raise ValueError(f"the batch size ({batch_size}) must divide over the {grid.data_size} data replicas")


def save_final(model: ShardedSAE, out: str | Path) -> Path:
    """Collective: the trained SAE as a single-process directory out (rank 0 writes it). Several latent
    shards are written first as out-sharded/ (train/sharded.py), which rank 0 consolidates from the files."""
    out = Path(out)
    if model.grid.latent_size == 1:
        if model.grid.is_main:
            model.to_sae().save(out)
    else:
        sharded = out.with_name(out.name + "-sharded")
        write_sharded(sharded, model.cfg, model.grid, model.row_state(), model.replicated_state(), model.metadata)
        if model.grid.is_main:
            consolidate(sharded, out)
    _broadcast_path(out)  # everyone waits for the files
    return out
