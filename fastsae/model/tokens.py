"""Which token positions carry a model's meaning: BOS, EOS, pad and the tokenizer's special tokens
(CLS, SEP, unk, …) carry outlier activations, so harvesting, streaming, evaluation and analysis all
leave them out, through these two functions and nowhere else."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def special_token_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """BOS, EOS and pad ids from the model config, and every special id of the tokenizer when given."""
    cfg = getattr(model, "config", None)
    ids = {getattr(cfg, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    flat = set(getattr(tokenizer, "all_special_ids", None) or [])
    for i in ids:
        flat.update(i if isinstance(i, (list, tuple)) else [i])
    return sorted(i for i in flat if i is not None)


def keep_mask(token_ids: Tensor, excluded: Sequence[int] | Tensor) -> Tensor:
    """True where token_ids (any shape) holds a token that is not excluded: the positions that count."""
    excluded = torch.as_tensor(list(excluded) if not isinstance(excluded, Tensor) else excluded,
                               dtype=token_ids.dtype, device=token_ids.device)
    return ~torch.isin(token_ids, excluded)
