"""Harvest: run a model over fixed context windows and write the activations at sites to a store."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..model import capture, keep_mask, special_token_ids
from .corpus import read_documents, token_windows
from .store import ActivationStore, StoreWriter


@torch.no_grad()
def harvest(model: nn.Module, sites: list[str], sequences: Tensor, out: str | Path, *, batch_size: int = 8,
            dtype: torch.dtype = torch.bfloat16, exclude_token_ids: list[int] | None = None,
            shard_rows: int = 65_536, resume: bool = False, model_name: str | None = None,
            source: dict | None = None, progress: bool = True) -> ActivationStore:
    """sequences (S, T) token ids, one context window per row. Positions holding an excluded token
    (default: the model's BOS/EOS/pad) are not stored. resume=True continues an interrupted harvest.
    source (JSON-able) records where the sequences came from; a resume must name the same."""
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
    start = writer.sequences_done
    T = sequences.shape[1]
    bar = tqdm(total=sequences.shape[0] * T, initial=start * T, disable=not progress, desc="harvest", unit="tok",
               unit_scale=True)
    with writer:  # holds the store's lock until the last shard is committed
        for first in range(start, sequences.shape[0], batch_size):
            batch = sequences[first:first + batch_size]
            acts = capture(model, sites, input_ids=batch.to(device))
            writer.add(acts, batch, keep_mask(batch, excluded), first)
            bar.update(batch.numel())
        bar.close()
        writer.flush()
    return ActivationStore(out)


def harvest_corpus(model: nn.Module, tokenizer, sites: list[str], corpus: str | Path, out: str | Path, *,
                   tokens: int, context_size: int = 128, text_field: str = "text", seed: int = 0,
                   **kwargs) -> ActivationStore:
    """Tokenise corpus (see corpus.read_documents) into windows worth `tokens` tokens and harvest them.
    The corpus settings are recorded in the manifest; kwargs go to harvest()."""
    windows = token_windows(tokenizer, read_documents(corpus, text_field), context_size, tokens, seed=seed)
    source = {"corpus": str(corpus), "text_field": text_field, "tokens": tokens, "context_size": context_size,
              "window_seed": seed}
    if kwargs.get("exclude_token_ids") is None:
        kwargs["exclude_token_ids"] = special_token_ids(model, tokenizer)
    return harvest(model, sites, windows, out, source=source, **kwargs)
