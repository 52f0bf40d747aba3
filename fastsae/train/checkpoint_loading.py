"""Loading a training checkpoint back into a trainer: the single-process layout `Trainer` writes, into a
`Trainer` (`load_single_process_state`); and either that layout or a sharded directory of several latent
shards (`DistributedTrainer`), written on any grid, into a `Trainer` or a `DistributedTrainer`
(`load_training_state`: this rank's rows of every per-latent tensor, the rest whole). See
train/distributed_training.py for the formats and when each is written. A trainer here is any object with
a Trainer's attributes (sae, optimizer, fused, generator, the counters); this module imports no trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .. import io
from ..config import SAEConfig
from ..ops.distributed import LatentShard
from ..sae import SAE
from . import checkpoint as ckpt
from .sharded import MANIFEST, REPLICATED, ShardedSAE, read_manifest, read_rows, row_tensor_names

# Optimizer state tensors are stored as optim.<param>.<field> (named by parameter, not by index).
OPTIM_PREFIX = "optim."


def _param_order(optimizer: torch.optim.Optimizer, model: SAE | ShardedSAE) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint of several latent shards (a sharded directory), not the single-process layout."""
    return (Path(path) / MANIFEST).is_file()


def read_checkpoint_meta(path: Path) -> dict:
    """{"step", "tokens", "total_steps", "config", ...} of a checkpoint of either format, checked: the
    single-process trainer.json, or what a sharded checkpoint's manifest keeps in its "extra"."""
    if not is_sharded_checkpoint(path):
        return ckpt.read_trainer_meta(path)
    return io.check_fields(read_manifest(path)["extra"], path / MANIFEST, {
        "step": int, "tokens": int, "total_steps": (int, type(None)), "config": dict, "optimizer": dict})


def load_single_process_state(trainer, path: Path) -> None:
    """The single-process checkpoint at path into trainer (a Trainer); every file is read and checked
    before anything of the trainer or its SAE changes."""
    device = trainer.sae.device
    sae = SAE.load(path / "sae", device=device)
    if sae.cfg != trainer.sae.cfg:
        raise ValueError(f"{path}: checkpoint SAE config {sae.cfg} differs from this run's {trainer.sae.cfg}")
    optimizer_state, kind = ckpt.read_optimizer(path, device)
    if kind != ("fused" if trainer.fused else "torch"):
        ours = "fused" if trainer.fused else "torch"
        raise ValueError(f"{path}: the checkpoint's optimizer is {kind!r}, this run's OptimizerConfig.kind "
                         f"gives {ours!r}: resume with OptimizerConfig(kind={kind!r})")
    state = ckpt.read_trainer_state(path)
    meta = ckpt.read_trainer_meta(path)
    total_steps = trainer.resumed_total_steps(meta["step"], meta["total_steps"], path)
    with torch.no_grad():
        mine = trainer.sae.state_dict()
        for name, t in sae.state_dict().items():
            mine[name].copy_(t)
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.step_count, trainer.tokens_seen, trainer.total_steps = meta["step"], meta["tokens"], total_steps
    trainer.tokens_since_fired = state["tokens_since_fired"].to(device)
    trainer.pool = state["pool"].to(device)
    trainer.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def load_training_state(trainer, path: Path) -> None:
    """Checkpoint path, of either format and written on any grid, into trainer: a DistributedTrainer takes
    its rank's rows, a Trainer (one process, every latent) all of them. Every file is read and checked
    before anything of the trainer or its SAE changes, as Trainer.load_checkpoint does."""
    model = trainer.sae
    d_sae = model.cfg.d_sae
    shard = model.shard if isinstance(model, ShardedSAE) else LatentShard(d_sae, 0, d_sae)
    row_names = row_tensor_names(model.cfg)
    rows, replicated, meta = _read_checkpoint(path, shard, row_names)
    saved = SAEConfig.from_dict(meta["sae"])
    if saved != model.cfg:
        raise ValueError(f"{path}: checkpoint SAE config {saved} differs from this run's {model.cfg}")
    kind, ours = ckpt.optimizer_kind(meta["optimizer"]), "fused" if trainer.fused else "torch"
    if kind != ours:
        raise ValueError(f"{path}: the checkpoint's optimizer is {kind!r}, this run's OptimizerConfig.kind "
                         f"gives {ours!r}: resume with OptimizerConfig(kind={kind!r})")
    total_steps = trainer.resumed_total_steps(meta["step"], meta["total_steps"], path)
    # where each tensor comes from: the rows read for this rank, or the tensors every rank holds whole
    source = {**{n: replicated for n in (*model.state_dict(), "pool", "generator", "torch_rng")},
              **{n: rows for n in (*row_names, "tokens_since_fired")}}
    missing = sorted(n for n, tensors in source.items() if n not in tensors)
    if missing:
        raise io.CorruptFileError(path, f"tensors {missing} are missing")
    optimizer_state = _optimizer_state(trainer.optimizer, model, rows, replicated, meta["optimizer"], path)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(source[name][name])
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.step_count, trainer.tokens_seen, trainer.total_steps = meta["step"], meta["tokens"], total_steps
    trainer.tokens_since_fired = rows["tokens_since_fired"].to(model.device)
    trainer.pool = replicated["pool"].to(model.device)
    trainer.generator.set_state(replicated["generator"])
    torch.set_rng_state(replicated["torch_rng"])


def _optimizer_state(optimizer: torch.optim.Optimizer, model: SAE | ShardedSAE, rows: dict[str, Tensor],
                     replicated: dict[str, Tensor], meta: dict, path: Path) -> dict:
    """The optimizer's state_dict from a checkpoint's optim.<param>.<field> tensors and scalars (named by
    parameter, so that they land on the same parameters whatever order this optimizer numbers them in)."""
    state: dict[int, dict] = {}
    index = {n: i for i, n in enumerate(_param_order(optimizer, model))}
    named = [(key[len(OPTIM_PREFIX):], t) for source in (rows, replicated) for key, t in source.items()
             if key.startswith(OPTIM_PREFIX)]
    for key, value in named + list(meta["scalars"].items()):
        name, field = key.rsplit(".", 1)
        if name not in index:
            raise io.CorruptFileError(path, f"optimizer state {key!r} names no trained parameter of this SAE "
                                            f"(it has {sorted(index)})")
        state.setdefault(index[name], {})[field] = value  # load_state_dict moves and casts tensors
    return {"state": state, "param_groups": meta["param_groups"]}


def _read_checkpoint(path: Path, s: LatentShard, row_tensors: tuple[str, ...]
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(rows s.start:s.stop of the per-latent tensors, the replicated ones, the metadata) of a checkpoint
    in either format, with optimizer moments named optim.<param>.<field> in both."""
    if is_sharded_checkpoint(path):
        meta = read_checkpoint_meta(path)
        manifest = read_manifest(path)
        rows = read_rows(path, manifest, s.start, s.stop)
        replicated = io.read_tensors(path / REPLICATED)
        return rows, replicated, {**meta, "sae": manifest["sae"]}
    sae = SAE.load(path / "sae")  # the single-process format: slice the rows out
    tensors = dict(sae.state_dict())
    opt_tensors = io.read_tensors(path / "optimizer.safetensors")
    opt_meta = io.read_json(path / "optimizer.json")
    order = _single_process_order(sae)
    scalars = {}
    for key, t in opt_tensors.items():
        _, idx, field = key.split(".", 2)
        tensors[f"{OPTIM_PREFIX}{order[int(idx)]}.{field}"] = t
    for key, value in opt_meta["scalars"].items():
        idx, field = key.split(".", 1)
        scalars[f"{order[int(idx)]}.{field}"] = value
    trainer = ckpt.read_trainer_state(path)
    meta = ckpt.read_trainer_meta(path)
    row_names = set(row_tensors) | {f"{OPTIM_PREFIX}{n}.{f}" for n in row_tensors for f in ("exp_avg", "exp_avg_sq")}
    rows = {n: t[s.start:s.stop] for n, t in tensors.items() if n in row_names}
    rows["tokens_since_fired"] = trainer["tokens_since_fired"][s.start:s.stop]
    replicated = {n: t for n, t in tensors.items() if n not in row_names}
    replicated.update(pool=trainer["pool"], generator=trainer["generator"], torch_rng=trainer["torch_rng"])
    meta = {**meta, "sae": sae.cfg.to_dict(),
            "optimizer": {"param_groups": opt_meta["param_groups"], "scalars": scalars}}
    return rows, replicated, meta


def _single_process_order(sae: SAE) -> list[str]:
    """Parameter names in the order Trainer's optimizers number them (SAEAdam: W_dec first; torch's
    Adam: sae.parameters() order, which starts with W_dec too)."""
    return [n for n, p in sae.named_parameters() if p.requires_grad]
