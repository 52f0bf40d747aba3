"""What `fastsae train --kl COEF` trains on: token windows and the model to splice into, from the run's data.

KL + reconstruction training (fastsae.train.kl) needs the model's forward, so its batches are token ids,
not stored activations. They come from the data source the run names:

    an activation store   the model its manifest names (or DataConfig.model), the site, and the corpus
                          windows it recorded (harvested_windows): the same tokens an MSE run on the store
                          sees; BOS/pad positions excluded by the store's own `excluded_token_ids`
    "stream"              DataConfig.model, site and corpus windows; the model's special tokens excluded

The SAE sees each window's kept positions at the source's normalising scale (folded into the saved SAE
as for an MSE run), so a KL run and an MSE run on the same store train at the same scale and L1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..train.kl import SpliceKL
from .data_sources import DataSource


def kl_training(data: DataSource) -> tuple[SpliceKL, Tensor]:
    """(the SpliceKL at data's site, the windows (S, T) of token ids it trains on), for data a store or a stream."""
    from ..harvest import ActivationStore, read_documents, token_windows
    from ..model import load, special_token_ids

    kind, record = data.cfg.kind, data.provenance.get("windows")
    if kind not in ("store", "stream") or record is None:
        raise ValueError(f"TrainConfig.kl_coefficient > 0 (--kl) trains on token windows: DataConfig.source must be "
                         f"an activation store harvested from a corpus, or 'stream', got {data.cfg.source!r}")
    if data.cfg.target_site is not None:
        raise ValueError("TrainConfig.kl_coefficient > 0 (--kl): a transcoder trains without the KL term")
    device = data.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(data.cfg.model or data.provenance["model"], device=device)
    excluded = (ActivationStore(data.cfg.source).meta["excluded_token_ids"] if kind == "store"
                else special_token_ids(model, tokenizer))
    every = token_windows(tokenizer, read_documents(record["corpus"], record["text_field"]), record["context_size"],
                          None, seed=record["seed"])
    picked = torch.cat([torch.arange(start, stop) for start, stop in record["ranges"]])
    if picked.numel() == 0 or int(picked.max()) >= every.shape[0]:
        raise ValueError(f"--kl: the recorded windows {record['ranges']} are not in the corpus {record['corpus']} "
                         f"({every.shape[0]} windows of {record['context_size']})")
    return SpliceKL(model, data.cfg.site, exclude_token_ids=excluded, scale=data.scale), every[picked]


def window_batches(windows: Tensor, rows: int, steps: int, seed: int, device) -> Iterator[Tensor]:
    """steps batches of max(1, rows // T) windows each (about rows positions), reshuffled every pass."""
    per = max(1, rows // windows.shape[1])
    generator = torch.Generator().manual_seed(seed)
    order = torch.zeros(0, dtype=torch.int64)
    for _ in range(steps):
        while order.numel() < per:
            order = torch.cat([order, torch.randperm(windows.shape[0], generator=generator)])
        yield windows[order[:per]].to(device)
        order = order[per:]
