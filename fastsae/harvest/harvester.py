"""Harvest: run a model over fixed context windows and write the activations at sites to a store, from one
process or several (each its part, merged by harvest/parallel.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..model import capture, keep_mask, special_token_ids
from . import parallel
from .corpus import first_windows, read_documents, token_windows, window_record
from .store import MANIFEST, ActivationStore, StoreWriter, is_store


@torch.no_grad()
def harvest(model: nn.Module, sites: list[str], sequences: Tensor, out: str | Path, *, batch_size: int = 8,
            dtype: torch.dtype = torch.bfloat16, exclude_token_ids: list[int] | None = None,
            shard_rows: int = 65_536, resume: bool = False, model_name: str | None = None,
            source: dict | None = None, progress: bool = True,
            window_range: tuple[int, int] | None = None) -> ActivationStore:
    """sequences (S, T) token ids, one context window per row. Positions holding an excluded token
    (default: the model's BOS/EOS/pad) are not stored. resume=True continues an interrupted harvest.
    source (JSON-able) records where the sequences came from; a resume must name the same.
    window_range=(lo, hi) harvests sequences[lo:hi] only, recorded under their indices in sequences
    (one rank's part of a parallel harvest, harvest_parallel)."""
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
                         resume=resume, source=source)
    lo, hi = window_range or (0, sequences.shape[0])
    start = max(writer.sequences_done, lo)
    T = sequences.shape[1]
    bar = tqdm(total=(hi - lo) * T, initial=(start - lo) * T, disable=not progress, desc="harvest", unit="tok",
               unit_scale=True)
    with writer:  # holds the store's lock until the last shard is committed
        for first in range(start, hi, batch_size):
            batch = sequences[first:min(first + batch_size, hi)]
            acts = capture(model, sites, input_ids=batch.to(device))
            writer.add(acts, batch, keep_mask(batch, excluded), first)
            bar.update(batch.numel())
        bar.close()
        writer.flush()
    return ActivationStore(out)


def harvest_parallel(model: nn.Module, sites: list[str], sequences: Tensor, out: str | Path, *, rank: int,
                     world_size: int, resume: bool = False, source: dict | None = None,
                     **kwargs) -> ActivationStore | None:
    """This rank's part of a harvest of sequences (S, T) into out; kwargs go to harvest(). With
    torch.distributed initialised every rank calls it and all return the merged store; without, each
    process harvests its part and the last to finish merges (the others return None)."""
    out = Path(out)
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if (out / MANIFEST).is_file() and not resume:
        raise FileExistsError(f"{out} already holds a store: pass resume=True, or another directory")
    parallel.check_world(out, world_size)
    lo, hi = parallel.window_range(sequences.shape[0], rank, world_size)
    part_source = {**(source or {}), "part": {"rank": rank, "world_size": world_size, "windows": [lo, hi]}}
    harvest(model, sites, sequences, parallel.part_dir(out, rank, world_size), resume=resume, source=part_source,
            window_range=(lo, hi), **kwargs)
    if dist.is_initialized():
        dist.barrier()
        if rank == 0:
            parallel.merge_parts(out, world_size)
        dist.barrier()
        return ActivationStore(out)
    return ActivationStore(out) if parallel.merge_parts(out, world_size, missing_ok=True) else None


def check_harvest(out: str | Path, tokens: int | None, context_size: int, resume: bool = False) -> None:
    """The settings of a harvest that can be checked before a model is loaded or a corpus read: the token
    budget holds one window, and out is a store only when resuming it."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(context_size) or context_size < 2:
        raise ValueError(f"context_size must be an int >= 2, got {context_size!r}")
    if tokens is not None and (not is_int(tokens) or tokens < context_size):
        raise ValueError(f"tokens must be an int >= context_size={context_size} (one window), got {tokens!r}")
    if not resume and is_store(out):
        raise FileExistsError(f"{out} already holds a store: pass resume=True, or another directory")


def harvest_corpus(model: nn.Module, tokenizer, sites: list[str], corpus: str | Path, out: str | Path, *,
                   tokens: int, context_size: int = 128, text_field: str = "text", seed: int = 0,
                   rank: int = 0, world_size: int = 1, **kwargs) -> ActivationStore | None:
    """Tokenise corpus (see corpus.read_documents) into windows worth `tokens` tokens and harvest them.
    The corpus settings are recorded in the manifest; kwargs go to harvest(). With world_size > 1 this
    process harvests its rank's range of the windows into the one store (harvest/parallel.py)."""
    # only rank 0 may find no store: the others start once it has made one
    check_harvest(out, tokens, context_size, resume=kwargs.get("resume", False) or rank != 0)
    windows = token_windows(tokenizer, read_documents(corpus, text_field), context_size, tokens, seed=seed)
    # windows: the indices (into the seeded order of the whole corpus) that this store holds, so that
    # evaluation can hold out the others; a store harvested before the record resumes without it.
    source = {"corpus": str(corpus), "text_field": text_field, "tokens": tokens, "context_size": context_size,
              "window_seed": seed, "windows": [[0, windows.shape[0]]]}
    if kwargs.get("resume") and is_store(out) and "windows" not in ActivationStore(out).meta.get("source", {}):
        del source["windows"]
    if kwargs.get("exclude_token_ids") is None:
        kwargs["exclude_token_ids"] = special_token_ids(model, tokenizer)
    if world_size > 1:
        return harvest_parallel(model, sites, windows, out, rank=rank, world_size=world_size, source=source,
                                **kwargs)
    return harvest(model, sites, windows, out, source=source, **kwargs)


def harvested_windows(store: ActivationStore) -> dict | None:
    """The window record (see corpus.window_record) of the sequences a corpus store holds, or None when
    its sequences did not come from a corpus. Stores from before the record hold the first sequences_done
    windows of their seeded order, which is what harvest_corpus always took."""
    source = store.meta.get("source") or {}
    if "corpus" not in source:
        return None
    done = store.meta["sequences_done"]
    ranges = first_windows(source.get("windows", [[0, done]]), done)
    return window_record(source["corpus"], source.get("text_field", "text"), source["context_size"],
                         source.get("window_seed", 0), ranges)
