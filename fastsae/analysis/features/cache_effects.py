"""The effects of a feature cache's latents, measured on the model and saved beside the cache.

    effects.safetensors
        logits.top_ids, logits.top_values          (d_sae, k)   direct effect: most promoted tokens
        logits.bottom_ids, logits.bottom_values    (d_sae, k)   ... and most suppressed (logit_effects.py)
        logits.mean, logits.std                    (d_sae,)     over the vocabulary: the browser shows z-scores
        logits.hist, logits.hist_lo, logits.hist_hi (d_sae, 32), (d_sae,) the logit changes over the vocabulary
                                                                when the latent is ablated: counts in equal bins
                                                                from lo to hi (mlp_hidden: through W_down)
        measured.latent                            (m,)         latents whose contexts were measured
        ablation                                   (m, n, W)    Δ log p of each token of each top context when
                                                                the latent is removed upstream (logit_effects.py)
        attribution                                (m, n, W)    change of the latent at the context's peak when
                                                                each earlier token is removed (context_attribution.py)
    NaN marks what was not measured (the first token; contexts past `attribution_contexts`).

Ablation and attribution need each context's whole prefix, so the harvested windows (S, T) are passed in.
Measuring is resumable: partial results are saved every `checkpoint_seconds` and a rerun skips the latents
already done.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ... import io
from ...model import special_token_ids
from ..decompositions import directions_of, transcoder_out_site
from .context_attribution import context_attribution
from .feature_cache import FeatureCache
from .logit_effects import ablation_effects, direct_logit_effects, down_projection

FORMAT_VERSION = 1
EFFECTS_FILE = "effects.safetensors"
EFFECTS_META = "effects.json"
PARTIAL_FILE = "effects.partial.safetensors"


def _contexts(cache: FeatureCache, windows: Tensor, latent: int, n: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """The prefixes (token ids up to each window's end) of a latent's first n top contexts, their window
    starts and peak positions."""
    t = cache.tensors
    W = cache.meta["window"]
    seq, start, peak = (t[f"top.{k}"][latent, :n] for k in ("sequence", "start", "position"))
    valid = seq >= 0
    seq, start, peak = seq[valid], start[valid], peak[valid]
    return [windows[s, :b + W].long() for s, b in zip(seq.tolist(), start.tolist(), strict=True)], start, peak


def measure_effects(cache: FeatureCache, model: nn.Module, site: str, decomposition, windows: Tensor | None,
                    latents: list[int] | None = None, *, contexts: int | None = None, attribution_contexts: int = 5,
                    mode: str = "remove", logit_k: int = 10, exclude_token_ids: list[int] | None = None,
                    batch_size: int = 64, progress: bool = True, checkpoint_seconds: float = 120.0) -> Path:
    """Write effects.safetensors into the cache: direct logit effects of every latent, and ablation and
    attribution on the top contexts of `latents` (default: every latent that fired) — the first `contexts`
    (default all) for ablation, the first `attribution_contexts` for attribution."""
    out = cache.path / EFFECTS_FILE
    count = cache.tensors["count"]
    chosen = [j for j in (range(cache.d_sae) if latents is None else latents) if count[j] > 0]
    n, W = cache.tensors["top.sequence"].shape[1], cache.meta["window"]
    n = n if contexts is None else min(n, contexts)
    settings = {"latents": chosen, "contexts": n, "attribution_contexts": attribution_contexts, "mode": mode,
                "site": site, "features": cache.meta.get("decomposition"), "windows": windows is not None}
    out_site = transcoder_out_site(decomposition)
    if out_site is not None:  # a transcoder is ablated where it writes (logit_effects.py)
        settings["out_site"] = out_site
    if out.is_file() and (cache.path / EFFECTS_META).is_file():
        done_meta = io.read_json(cache.path / EFFECTS_META)
        if done_meta.get("format_version") == FORMAT_VERSION and done_meta.get("settings") == settings:
            return out  # measured already
    tensors, notes = _logit_effects(model, decomposition, logit_k, site)
    excluded = special_token_ids(model) if exclude_token_ids is None else exclude_token_ids
    measure = windows is not None and chosen and getattr(model, "can_generate", lambda: False)()
    if windows is None:
        notes["measured"] = "no harvested windows: ablation and attribution need each context's prefix"
    partial = _PartialEffects(cache.path, settings, n, W)
    if measure:
        partial.load()
        last = time.monotonic()
        todo = [j for j in chosen if j not in partial.done]
        for j in tqdm(todo, disable=not progress, desc="effects", unit="feature"):
            partial.done[j] = _measure_latent(cache, model, site, decomposition, windows, j, n, attribution_contexts,
                                              mode, excluded, batch_size)
            if time.monotonic() - last >= checkpoint_seconds:
                partial.save()
                last = time.monotonic()
    measured = partial.stacked()
    keys = measured["latent"].tolist()
    tensors.update({"measured.latent": measured["latent"], "ablation": measured["ablation"],
                    "attribution": measured["attribution"]})
    io.write_tensors(out, tensors, metadata={"format_version": str(FORMAT_VERSION)})
    io.write_json(cache.path / EFFECTS_META, {"format_version": FORMAT_VERSION, "settings": settings,
                                              "notes": notes, "measured": keys})
    partial.remove()
    return out


def _logit_effects(model: nn.Module, decomposition, logit_k: int,
                   site: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(the logits.* tensors, notes): the direct logit effects (through the down-projection at an mlp_hidden
    site), or a note saying why there are none."""
    tensors: dict[str, Tensor] = {}
    notes: dict[str, str] = {}
    directions = directions_of(decomposition)
    try:
        if directions is None:
            raise ValueError("the decomposition has no decoder directions")
        down = down_projection(model, site) if site.startswith("mlp_hidden.") else None
        effects = direct_logit_effects(model, directions, logit_k, down=down)
        tensors.update({f"logits.{k}": v for k, v in effects.items()})
    except ValueError as err:
        notes["logits"] = str(err)
    return tensors, notes


def _measure_latent(cache: FeatureCache, model: nn.Module, site: str, decomposition, windows: Tensor, j: int,
                    n: int, attribution_contexts: int, mode: str, excluded: list[int],
                    batch_size: int) -> tuple[Tensor, Tensor]:
    """(ablation, attribution), each (n, W), of latent j on its first n top contexts (NaN: not measured)."""
    W = cache.meta["window"]
    prefixes, starts, peaks = _contexts(cache, windows, j, n)
    length = max(p.shape[0] for p in prefixes)
    pad = excluded[0] if excluded else 0
    ids = torch.stack([torch.cat([p, p.new_full((length - p.shape[0],), pad)]) for p in prefixes])
    ablation = torch.full((n, W), float("nan"))
    attribution = torch.full((n, W), float("nan"))
    window = starts[:, None] + torch.arange(W)  # (B, W): each context's window in its prefix
    ablation[:len(prefixes)] = ablation_effects(model, site, decomposition, j, ids, excluded, window)
    a = min(attribution_contexts, len(prefixes))
    if a:
        _, changes = context_attribution(model, site, decomposition, j, prefixes[:a], peaks[:a].tolist(),
                                         starts[:a].tolist(), mode=mode, skip_token_ids=excluded,
                                         batch_size=batch_size)
        for b, s in enumerate(starts[:a].tolist()):
            attribution[b] = changes[b][s:s + W]
    return ablation, attribution


class _PartialEffects:
    """The latents measured so far ({latent: (ablation, attribution)}), checkpointed beside the cache with the
    settings they were measured with (a checkpoint of other settings is not resumed)."""

    def __init__(self, directory: Path, settings: dict, n: int, W: int):
        self.path, self.settings_path = directory / PARTIAL_FILE, directory / (PARTIAL_FILE + ".json")
        self.settings, self.n, self.W = settings, n, W
        self.done: dict[int, tuple[Tensor, Tensor]] = {}

    def load(self) -> None:
        if self.path.is_file() and self.settings_path.is_file():
            if io.read_json(self.settings_path) == self.settings:  # else: other settings, start again
                saved = io.read_tensors(self.path)
                self.done = {int(j): (saved["ablation"][i], saved["attribution"][i])
                             for i, j in enumerate(saved["latent"].tolist())}

    def stacked(self) -> dict[str, Tensor]:
        keys = sorted(self.done)
        blank = torch.zeros(0, self.n, self.W)
        return {"latent": torch.tensor(keys, dtype=torch.int64),
                "ablation": torch.stack([self.done[j][0] for j in keys]) if keys else blank,
                "attribution": torch.stack([self.done[j][1] for j in keys]) if keys else blank}

    def save(self) -> None:
        io.write_tensors(self.path, self.stacked())
        io.write_json(self.settings_path, self.settings)  # the commit point

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.settings_path.unlink(missing_ok=True)


def load_effects(cache_dir: str | Path) -> dict[str, Tensor] | None:
    """The cache's effects tensors, or None when none were measured."""
    path = Path(cache_dir) / EFFECTS_FILE
    if not path.is_file():
        return None
    meta = io.read_json(Path(cache_dir) / EFFECTS_META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{Path(cache_dir) / EFFECTS_META}: format_version must be {FORMAT_VERSION}, "
                         f"got {meta.get('format_version')!r}")
    return io.read_tensors(path)
