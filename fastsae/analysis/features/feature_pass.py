"""Feature statistics in one streaming pass, saved as a "feature cache" that the browser and autointerp read.

    cache = collect_features(sae, StoreSource(store, site, windows), "runs/gemma/features")
    cache = FeatureCache.load("runs/gemma/features")
    cache.top(1234)                   # [Example]: the 20 contexts where latent 1234 is largest
    cache.samples(1234)               # [Example]: weaker activations, meta["quantile"] 0 (weakest) .. Q-1
    cache.random_examples(1234, 10, seed=0)   # random contexts, the latent's activation on them exact
    cache.stats(1234)                 # count, density, mean and max activation, histogram

What one pass keeps per latent (memory O(d_sae · n), whatever the token count; on the SAE's device):

    top-n contexts     the n sequences where the latent's maximum is largest, one context per sequence:
                       a window of `before` tokens before its maximum and `after` after it (shifted to stay
                       inside the sequence), with the latent's activation at every token
    samples            a uniform sample (bottom-n of a hash of (latent, sequence)) of the other sequences
                       where it fires, labelled by quantile of their maxima among the sample (Bills et al.
                       2023 and Paulo et al. 2024 score on such quantile-stratified contexts)
    token sample       a uniform sample of the tokens where it fires (value and token id; the bottom-n of a
                       hash of the row, so latents firing on the same token share priorities, which is
                       harmless for each latent's sample): the browser splits the histogram by token from it
    statistics         firing count, density (count / tokens), mean activation when firing, maximum, and a
                       histogram of B bins over [0, 2^e), 2^e the smallest power of two above the maximum
                       (kept exact while streaming: when the maximum passes 2^e, pairs of bins merge)
    random pool        `random_contexts` whole sequences (chosen by a hash of the sequence index) with their
                       full sparse codes, so any latent's activation on a random context is exact

Ties (top-n): the higher activation first; equal activations keep stream order (store rows: sequence,
then position), so the earlier token wins — within a sequence for its maximum, and between sequences.

A decomposition is anything with `encode(x) -> SparseLatents` or dense codes and a width: an SAE, or a
baseline of fastsae.evaluation.baselines (see decompositions.py; `SplitSigns` reads both signs). Sources
(activation_chunks.py): an activation store's shards, or corpus windows through the model. The cache's files
and reader: feature_cache.py. The streaming state (FeatureConfig, FeaturePass): feature_pass_state.py.

Cost: after the first chunks, each list drops the candidates that cannot beat its n-th entry with one
gather, so the pass costs about 1.5x the SAE's encoder on CPU (bench/features.py).

The pass is resumable: its state is checkpointed atomically between chunks (a store's shards, or groups
of corpus windows), and a resumed pass ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ... import io
from ..decompositions import SplitSigns, active_entries, directions_of, fingerprint, width_of
from .activation_chunks import ModelSource, StoreSource, store_windows
from .feature_cache import FORMAT_VERSION, META_FILE, TENSORS_FILE, TIE_RULE, FeatureCache, write_vocab
from .feature_pass_state import FeatureConfig, FeaturePass

__all__ = ["FeatureCache", "FeatureConfig", "FeaturePass", "ModelSource", "SplitSigns", "StoreSource",
           "active_entries", "collect_features", "directions_of", "store_windows", "width_of", "write_vocab"]
PARTIAL = "partial"


def _neighbours(directions: Tensor, k: int, block: int = 1024) -> tuple[Tensor, Tensor]:
    """(width, k) indices and cosines of each direction's k nearest others."""
    unit = directions.float()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, unit.shape[0] - 1)
    ids, cos = [], []
    for first in range(0, unit.shape[0], block):
        sim = unit[first:first + block] @ unit.T  # (b, width)
        sim[torch.arange(sim.shape[0]), torch.arange(first, first + sim.shape[0])] = float("-inf")
        top = sim.topk(k, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return torch.cat(ids).cpu(), torch.cat(cos).cpu()


def collect_features(decomposition, source, out: str | Path, cfg: FeatureConfig | None = None, *,
                     resume: bool = True, overwrite: bool = False, progress: bool = True, meta: dict | None = None,
                     stop_after: int | None = None) -> FeatureCache:
    """Run the pass over source (StoreSource or ModelSource) and write the feature cache into out.

    An interrupted pass continues from its last checkpoint when resume=True; a finished cache for the same
    decomposition, source and settings is returned as it is, one of other settings is replaced only when
    overwrite=True. stop_after=k stops after k chunks (checkpointed), as an interruption would (for tests).
    meta (JSON-able) is recorded with the cache."""
    cfg = cfg or FeatureConfig()
    out = Path(out)
    d_sae = width_of(decomposition)
    if isinstance(decomposition, nn.Module):
        decomposition.eval()  # BatchTopK reads its inference threshold
    device = getattr(decomposition, "device", None) or torch.device("cpu")
    identity = {"decomposition": fingerprint(decomposition), "source": source.describe(), "config": asdict(cfg)}
    if _finished(out, identity, overwrite):
        return FeatureCache.load(out)
    state = FeaturePass(d_sae, cfg, source.context_size, source.n_sequences, device)
    partial = out / PARTIAL
    _resume(state, partial, identity, resume, overwrite, device)
    _stream(state, decomposition, source, partial, identity, stop_after, progress)
    tensors = state.result()
    directions = directions_of(decomposition)
    if directions is not None and cfg.neighbours and d_sae > 1:
        tensors["neighbours.latent"], tensors["neighbours.cosine"] = _neighbours(directions, cfg.neighbours)
    io.write_tensors(out / TENSORS_FILE, tensors, metadata={"format_version": str(FORMAT_VERSION)})
    io.write_json(out / META_FILE, {
        "format_version": FORMAT_VERSION, **identity, "d_sae": d_sae, "tokens": state.rows,
        "sequences": source.n_sequences, "context_size": source.context_size, "window": state.W,
        "ties": TIE_RULE, "meta": meta or {}})  # the commit point
    for f in ("state.safetensors", "progress.json"):
        (partial / f).unlink(missing_ok=True)
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    return FeatureCache.load(out)


def _finished(out: Path, identity: dict, overwrite: bool) -> bool:
    """Whether out holds the finished cache of identity; one of another identity is removed when overwrite."""
    if (out / META_FILE).is_file():
        done = io.read_json(out / META_FILE)
        if {k: done.get(k) for k in identity} == identity:
            return True
        if not overwrite:
            raise FileExistsError(f"{out} already holds a feature cache of another dictionary, source or settings: "
                                  f"pass another directory, or overwrite=True")
        (out / META_FILE).unlink()
    return False


def _resume(state: FeaturePass, partial: Path, identity: dict, resume: bool, overwrite: bool, device) -> None:
    """state from the checkpoint in partial, when resuming one of the same identity (another is refused)."""
    if (partial / "progress.json").is_file() and (overwrite or not resume):
        (partial / "progress.json").unlink()
    if resume and (partial / "progress.json").is_file():
        saved = io.read_json(partial / "progress.json")
        if saved.get("identity") != identity:
            raise ValueError(f"{partial}: an interrupted pass of other settings (dictionary, source or config); "
                             f"delete it or write to another directory")
        state.load_state_dict(io.read_tensors(partial / "state.safetensors", device=str(device)))


def _stream(state: FeaturePass, decomposition, source, partial: Path, identity: dict, stop_after: int | None,
            progress: bool) -> None:
    """The source's chunks from where state stopped, encoded and added, checkpointed every checkpoint_seconds
    (and after stop_after chunks, where it stops as an interruption would)."""
    cfg, d_sae = state.cfg, state.d_sae
    bar = tqdm(total=source.tokens, initial=state.rows, disable=not progress, desc="features", unit="tok",
               unit_scale=True)
    last_save = time.monotonic()

    def checkpoint() -> None:
        io.write_tensors(partial / "state.safetensors", state.state_dict())
        io.write_json(partial / "progress.json", {"format_version": FORMAT_VERSION, "identity": identity,
                                                  "chunks": state.chunks})  # the commit point

    for done, chunk in enumerate(source.chunks(state.chunks), start=state.chunks + 1):
        row, lat, val = active_entries(decomposition, chunk.x, cfg.batch_rows)
        if lat.numel() and int(lat.max()) >= d_sae:
            raise ValueError(f"{type(decomposition).__name__}.encode returned latent {int(lat.max())}, "
                             f"beyond its width {d_sae}")
        state.add(chunk, row, lat, val)
        bar.update(chunk.token_ids.shape[0])
        if time.monotonic() - last_save >= cfg.checkpoint_seconds or stop_after == done:
            checkpoint()
            last_save = time.monotonic()
        if stop_after == done:
            bar.close()
            raise KeyboardInterrupt(f"stopped after {done} chunks (stop_after)")
    bar.close()
