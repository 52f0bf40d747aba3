"""The feature cache on disk and read back.

    <cache>/features.json          format_version, the dictionary's fingerprint, source, config, d_sae, tokens,
                                   sequences, context_size, window, the tie rule, caller's meta (the commit point)
    <cache>/features.safetensors   count, mean, max, histogram, histogram_exponent       (d_sae, ...)
                                   top.{value,sequence,position,start,tokens,acts}      (d_sae, n[, W])
                                   samples.{value,sequence,position,start,tokens,acts,quantile}
                                   token_sample.{value,token}                            (d_sae, R)
                                   pool.{tokens,sequence} (P, T), (P,); pool.{slot,position,latent,value} (E,)
                                   neighbours.{latent,cosine}                            (d_sae, k)
    <cache>/vocab.json             the text of every token id it holds
    <cache>/effects.safetensors    see effects.py;  <cache>/annotations/*.json  see browser.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ... import io
from .feature_contexts import Example

FORMAT_VERSION = 1
META_FILE = "features.json"
TENSORS_FILE = "features.safetensors"
VOCAB_FILE = "vocab.json"
NO_EXPONENT = -1000  # histogram exponent of a latent that never fired (fp32 exponents are > -150)
TIE_RULE = "higher activation first; equal activations: the earlier token in stream order (sequence, position)"


def write_vocab(cache_dir: str | Path, tokenizer, extra_ids: Tensor | None = None) -> dict[int, str]:
    """vocab.json: every token id the cache (and extra_ids) holds, decoded one by one, as the browser shows it."""
    cache_dir = Path(cache_dir)
    ids: set[int] = set()
    with io.open_tensors(cache_dir / TENSORS_FILE) as f:  # a damaged file: CorruptFileError naming it
        for key in ("top.tokens", "samples.tokens", "token_sample.token", "pool.tokens"):
            if key in f.keys():
                ids.update(torch.unique(f.get_tensor(key)).tolist())
    if extra_ids is not None:
        ids.update(torch.unique(extra_ids).tolist())
    ids.discard(-1)
    vocab = {i: tokenizer.decode([i]) for i in sorted(ids)}
    io.write_json(cache_dir / VOCAB_FILE, {"format_version": FORMAT_VERSION, "tokens": {str(k): v for k, v in
                                                                                      vocab.items()}})
    return vocab


@dataclass
class FeatureCache:
    """A feature cache read back. Tensors are loaded whole (the browser reads every latent anyway)."""

    path: Path
    meta: dict
    tensors: dict[str, Tensor]
    vocab: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        path = Path(path)
        meta = io.read_json(path / META_FILE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path / META_FILE}: format_version must be {FORMAT_VERSION}, "
                             f"got {meta.get('format_version')!r}")
        tensors = io.read_tensors(path / TENSORS_FILE)
        vocab = {}
        if (path / VOCAB_FILE).is_file():
            vocab = {int(k): v for k, v in json.loads((path / VOCAB_FILE).read_text())["tokens"].items()}
        return cls(path, meta, tensors, vocab)

    @property
    def d_sae(self) -> int:
        return self.meta["d_sae"]

    @property
    def tokens_seen(self) -> int:
        return self.meta["tokens"]

    def token_str(self, token_id: int) -> str:
        return self.vocab.get(token_id, "" if token_id < 0 else f"<{token_id}>")

    def _check(self, latent: int) -> int:
        if not isinstance(latent, int) or not 0 <= latent < self.d_sae:
            raise ValueError(f"latent must be an int in [0, {self.d_sae}), got {latent!r}")
        return latent

    def _example(self, prefix: str, latent: int, j: int, **meta) -> Example:
        t = self.tensors
        ids = t[f"{prefix}.tokens"][latent, j].tolist()
        return Example(ids, [self.token_str(i) for i in ids], t[f"{prefix}.acts"][latent, j].tolist(),
                       window=int(t[f"{prefix}.sequence"][latent, j]), start=int(t[f"{prefix}.start"][latent, j]),
                       meta={"position": int(t[f"{prefix}.position"][latent, j]), **meta})

    def top(self, latent: int) -> list[Example]:
        """The latent's top contexts, strongest first; meta: rank, position of the maximum."""
        self._check(latent)
        n = int((self.tensors["top.sequence"][latent] >= 0).sum())
        return [self._example("top", latent, j, rank=j) for j in range(n)]

    def samples(self, latent: int) -> list[Example]:
        """Weaker contexts (outside the top), strongest first; meta["quantile"]: 0 the weakest of
        `quantiles` equal parts of the sampled contexts."""
        self._check(latent)
        q = self.tensors["samples.quantile"][latent]
        return [self._example("samples", latent, j, quantile=int(q[j])) for j in range(int((q >= 0).sum()))]

    def random_examples(self, latent: int, n: int, seed: int = 0, *, nonactivating: bool = False) -> list[Example]:
        """n contexts of the pool's random sequences (a window of the cache's width at a random start), with
        the latent's exact activation at every token; nonactivating=True keeps only contexts where it is 0."""
        self._check(latent)
        t = self.tensors
        P, T = t["pool.tokens"].shape
        W = self.meta["window"]
        gen = torch.Generator().manual_seed(seed)
        on = t["pool.latent"] == latent
        dense = torch.zeros(P, T)
        dense[t["pool.slot"][on], t["pool.position"][on]] = t["pool.value"][on]
        found = []
        for slot in torch.randperm(P, generator=gen).tolist():
            start = int(torch.randint(0, T - W + 1, (1,), generator=gen))
            acts = dense[slot, start:start + W]
            if nonactivating and bool((acts > 0).any()):
                continue
            ids = t["pool.tokens"][slot, start:start + W].tolist()
            found.append(Example(ids, [self.token_str(i) for i in ids], acts.tolist(),
                                 window=int(t["pool.sequence"][slot]), start=start, meta={"random": True}))
            if len(found) == n:
                break
        return found

    def histogram(self, latent: int) -> tuple[Tensor, Tensor]:
        """(edges (B + 1,), counts (B,)) of the latent's activations when firing."""
        self._check(latent)
        counts = self.tensors["histogram"][latent]
        e = int(self.tensors["histogram_exponent"][latent])
        top = 2.0 ** e if e != NO_EXPONENT else 1.0
        return torch.linspace(0, top, counts.numel() + 1), counts

    def stats(self, latent: int) -> dict:
        self._check(latent)
        t = self.tensors
        count = int(t["count"][latent])
        return {"latent": latent, "count": count, "density": count / max(self.tokens_seen, 1),
                "mean_activation": float(t["mean"][latent]), "max_activation": float(t["max"][latent])}

    @property
    def density(self) -> Tensor:
        return self.tensors["count"].double() / max(self.tokens_seen, 1)

    def neighbours(self, latent: int) -> list[tuple[int, float]]:
        """The nearest latents by decoder cosine, nearest first (empty when the dictionary had no directions)."""
        self._check(latent)
        if "neighbours.latent" not in self.tensors:
            return []
        return list(zip(self.tensors["neighbours.latent"][latent].tolist(),
                        self.tensors["neighbours.cosine"][latent].tolist(), strict=True))
