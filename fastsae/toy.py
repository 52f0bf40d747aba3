"""Ground-truth recovery: synthetic activations built from a known overcomplete dictionary.

The toy setup the seed paper validated SAEs on (Sharkey, Braun & Millidge 2022;
Cunningham et al. 2023): n_features true unit-norm directions in R^d_in
(n_features > d_in, so they are in superposition); each sample is a sparse
non-negative combination of a few of them. A good SAE finds the true
directions, measured by the mean max cosine similarity (MMCS) between true
features and learnt decoder rows.

`ToySites` is the same for dictionaries that read or write several sites: one sparse code per sample and one
true dictionary per site, so a transcoder's (x, y) pairs or a crosscoder's sites side by side come with their
ground truth (latent i's true decoder at site s is `sites[s].features[i]`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ToyDictionary:
    features: Tensor  # (n_features, d_in), unit rows
    active_per_sample: float  # expected number of active features per sample

    @classmethod
    def random(cls, d_in: int = 64, n_features: int = 512, active_per_sample: float = 5.0,
               seed: int = 0) -> ToyDictionary:
        if not 0 < active_per_sample <= n_features:
            raise ValueError(f"active_per_sample must be in (0, n_features={n_features}], got {active_per_sample}")
        gen = torch.Generator().manual_seed(seed)
        features = torch.randn(n_features, d_in, generator=gen)
        return cls(features / features.norm(dim=1, keepdim=True), active_per_sample)

    def codes(self, n: int, gen: torch.Generator) -> Tensor:
        """(n, n_features): each feature on with probability active_per_sample / n_features, magnitude U(0, 1)."""
        n_features = self.features.shape[0]
        on = torch.rand(n, n_features, generator=gen) < self.active_per_sample / n_features
        return torch.rand(n, n_features, generator=gen) * on

    def sample(self, n: int, gen: torch.Generator) -> Tensor:
        """(n, d_in): sparse codes (see codes) times the true features."""
        return self.codes(n, gen) @ self.features

    def batches(self, batch_size: int, steps: int, seed: int = 1) -> _Batches:
        return _Batches(self, batch_size, steps, seed)


@dataclass
class ToySites:
    sites: list[ToyDictionary]  # one true dictionary per site, the same number of features
    pairs: bool  # serve (x, y) pairs of the first two sites (a transcoder's), else every site side by side

    @classmethod
    def random(cls, n_sites: int, pairs: bool, d_in: int = 64, n_features: int = 512,
               active_per_sample: float = 5.0, seed: int = 0) -> ToySites:
        if n_sites < 2 or (pairs and n_sites != 2):
            raise ValueError(f"n_sites must be >= 2 (exactly 2 for pairs), got {n_sites}")
        return cls([ToyDictionary.random(d_in, n_features, active_per_sample, seed=seed + 7919 * s)
                    for s in range(n_sites)], pairs)

    def sample(self, n: int, gen: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        """(x, y) (n, d_in) each, or (n, n_sites · d_in): one code per sample, decoded at every site."""
        codes = self.sites[0].codes(n, gen)
        outs = [codes @ site.features for site in self.sites]
        return (outs[0], outs[1]) if self.pairs else torch.cat(outs, dim=1)

    def batches(self, batch_size: int, steps: int, seed: int = 1) -> _Batches:
        return _Batches(self, batch_size, steps, seed)


class _Batches:
    """A sized, re-iterable stream of toy batches (so the trainer knows the total step count)."""

    def __init__(self, toy: ToyDictionary | ToySites, batch_size: int, steps: int, seed: int):
        self.toy, self.batch_size, self.steps, self.seed = toy, batch_size, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield self.toy.sample(self.batch_size, gen)


def mmcs(true_features: Tensor, learnt: Tensor) -> float:
    """Mean over true features of the max cosine similarity with any learnt direction (rows)."""
    t = true_features.float() / true_features.float().norm(dim=1, keepdim=True)
    d = learnt.float() / learnt.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (t @ d.T).max(dim=1).values.mean().item()
