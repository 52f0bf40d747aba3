"""Harvest: run a model over fixed context windows and write the activations at sites to a store."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .sites import capture
from .store import ActivationStore, StoreWriter


def special_token_ids(model: nn.Module) -> list[int]:
    """BOS, EOS and pad ids from the model config: their positions carry outlier activations."""
    cfg = getattr(model, "config", None)
    ids = {getattr(cfg, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    flat = set()
    for i in ids:
        flat.update(i if isinstance(i, (list, tuple)) else [i])
    return sorted(i for i in flat if i is not None)


@torch.no_grad()
def harvest(model: nn.Module, sites: list[str], sequences: Tensor, out: str | Path, *, batch_size: int = 8,
            dtype: torch.dtype = torch.bfloat16, exclude_token_ids: list[int] | None = None,
            shard_rows: int = 65_536, resume: bool = False, model_name: str | None = None,
            progress: bool = True) -> ActivationStore:
    """sequences (S, T) token ids, one context window per row. Positions holding an excluded token
    (default: the model's BOS/EOS/pad) are not stored. resume=True continues an interrupted harvest."""
    if sequences.dim() != 2 or sequences.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sequences must be (S, T) integer token ids, got {sequences.dtype} {tuple(sequences.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    excluded = special_token_ids(model) if exclude_token_ids is None else sorted(exclude_token_ids)
    probe = capture(model, sites, input_ids=sequences[:1].to(device))
    writer = StoreWriter(out, model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
                         sites={s: a.shape[-1] for s, a in probe.items()}, dtype=dtype,
                         context_size=sequences.shape[1], excluded_token_ids=excluded, shard_rows=shard_rows,
                         resume=resume)
    excluded_t = torch.tensor(excluded, dtype=sequences.dtype)
    start = writer.sequences_done
    bar = tqdm(total=sequences.shape[0], initial=start, disable=not progress, desc="harvest", unit="seq")
    for first in range(start, sequences.shape[0], batch_size):
        batch = sequences[first:first + batch_size]
        acts = capture(model, sites, input_ids=batch.to(device))
        writer.add(acts, batch, ~torch.isin(batch, excluded_t), first)
        bar.update(batch.shape[0])
    bar.close()
    writer.flush()
    return ActivationStore(out)
