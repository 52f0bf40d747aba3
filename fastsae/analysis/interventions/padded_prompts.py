"""Prompts of mixed lengths as one batch: left-padded, with the attention mask and the position ids that make
every row compute exactly what it computes alone, so the last position of every row is its own last token.

    batch = PromptBatch.from_texts(tokenizer, ["When Mary and John went", "Then, John said to"])
    logits = last_logits(model, batch)           # (B, V): the next-token logits of every prompt

Left padding (not right) because the analysis tools read the next-token prediction of each prompt: with every
prompt ending at column T-1 the LM head runs on one column (`logits_to_keep=1`), which for Gemma 3 (vocabulary
262,144 = 400x its width 640) is most of a full forward's cost saved. Pairs of prompts of equal length (a
clean prompt and its corrupted twin) stay aligned column by column, so activations patch position by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...model import keep_mask


@dataclass
class PromptBatch:
    input_ids: Tensor  # (B, T) int64, each row left-padded with pad_id
    attention_mask: Tensor  # (B, T) int64, 1 on real tokens

    def __post_init__(self):
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(f"PromptBatch: input_ids {tuple(self.input_ids.shape)} and attention_mask "
                             f"{tuple(self.attention_mask.shape)} must be the same (batch, seq) shape")

    @classmethod
    def from_ids(cls, rows: Sequence[Sequence[int]], pad_id: int) -> PromptBatch:
        """Token-id lists of any lengths -> one left-padded batch."""
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("PromptBatch.from_ids needs at least one row, each with at least one token")
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, T - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[b, T - len(row):] = 1
        return cls(ids, mask)

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str]) -> PromptBatch:
        """Texts -> a batch, each prompt starting with BOS when the tokenizer has one (as in training windows)."""
        return cls.from_ids([encode(tokenizer, t) for t in texts], pad_id(tokenizer))

    @property
    def position_ids(self) -> Tensor:
        """(B, T): 0 at each row's first real token (transformers would count the padding otherwise)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp_min(0)

    def inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for model(**batch.inputs())."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def keep(self, excluded: Sequence[int] | Tensor = ()) -> Tensor:
        """(B, T) bool: real tokens that are not excluded (e.g. BOS, whose activations are outliers)."""
        return self.attention_mask.bool() & keep_mask(self.input_ids, excluded)

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows) -> PromptBatch:
        """A sub-batch (a slice or index tensor of rows); its left columns may be all padding."""
        return PromptBatch(self.input_ids[rows], self.attention_mask[rows])


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return 0


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text, BOS first when the tokenizer has a BOS token (added if its template does not)."""
    ids = list(tokenizer(text).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def last_logits(model: nn.Module, batch: PromptBatch) -> Tensor:
    """(B, V) next-token logits at each prompt's last token (float32, or float64 for a float64 model); the LM
    head runs on that column only."""
    device = next(model.parameters()).device
    return widen(model(**batch.to(device).inputs(), logits_to_keep=1).logits[:, -1])


def widen(t: Tensor) -> Tensor:
    """t in float32, or in its own dtype if wider: metrics of float64 test models keep their precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
