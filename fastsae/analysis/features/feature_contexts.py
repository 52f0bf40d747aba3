"""One feature's activations on one context: what the feature cache stores, the browser shows and
autointerp reads. Shared by every analysis tool so they agree on one shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    token_ids: list[int]  # the context window around the activation, in order
    tokens: list[str]  # the same tokens decoded one by one (as the tokenizer renders each)
    activations: list[float]  # the feature's activation at each token of the window (0 where it is off)
    window: int = -1  # which harvest/corpus window it came from (-1: unknown)
    start: int = 0  # position of token_ids[0] within that window
    meta: dict = field(default_factory=dict)  # e.g. {"quantile": 3} for stratified samples

    def __post_init__(self):
        if not (len(self.token_ids) == len(self.tokens) == len(self.activations)):
            raise ValueError(f"Example: token_ids, tokens and activations must have one entry per token, got "
                             f"{len(self.token_ids)}, {len(self.tokens)}, {len(self.activations)}")

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)
