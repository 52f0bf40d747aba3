"""Reading a trained SAE end to end: the feature cache, its measured effects, and the browser.

    run_features("runs/gemma/train/sae", "runs/gemma/features")            # over the SAE's own store
    index, table = run_browse("runs/gemma/features")                      # writes features/browser/
    build_and_browse(...)                                                  # both: what `fastsae run` ends with

The model and site default to what the SAE recorded; the activations come from its activation store
(with the harvested windows rebuilt from the store's corpus settings, so contexts show BOS/EOS and effects
see each context's whole prefix), or from a corpus through the model when no store is given. Ablation and
attribution run the model once per feature, so they are measured for `effects` features (the best by the
one-token score, ranking.py; None: all), the direct logit effect for all. A transcoder's site is its
in-site (the pass encodes its activations there); its ablations act at its out-site (logit_effects.py).
"""

from __future__ import annotations

from pathlib import Path

from ...sae import SAE
from .browser_site import write_browser
from .cache_effects import load_effects, measure_effects
from .feature_pass import (
    FeatureCache,
    FeatureConfig,
    ModelSource,
    StoreSource,
    collect_features,
    store_windows,
    write_vocab,
)
from .ranking import ranked_latents, top_features_table


def run_features(sae_path: str | Path, out: str | Path, *, store: str | Path | None = None,
                 model: str | None = None, site: str | None = None, corpus: str | None = None,
                 tokens: int | None = None, context_size: int = 128, config: FeatureConfig | None = None,
                 effects: int | None = 32, device: str = "cpu", progress: bool = True) -> FeatureCache:
    """The feature cache of the SAE in sae_path, written into out (resumable; replaced when the SAE or the
    settings changed). store: an activation store (default: the one the SAE was trained on, unless corpus is
    given); corpus/tokens/context_size: read the corpus through the model instead."""
    import torch

    from ...harvest.corpus import read_documents, token_windows
    from ...harvest.store import ActivationStore, is_store
    from ...model import load, special_token_ids

    sae = SAE.load(sae_path, device=device)
    model = model or sae.metadata.get("model")
    site = site or sae.metadata.get("site")
    if not model or not site:
        raise ValueError(f"{sae_path}: the SAE does not record its model and site; pass model= and site=")
    lm, tokenizer = load(model, device=device)
    excluded = special_token_ids(lm, tokenizer)
    if store is None and corpus is None:
        store = sae.metadata.get("store")
        if not store or not is_store(store):
            raise ValueError(f"{sae_path}: no activation store recorded (or it is gone); pass store= or corpus=")
    if store is not None:
        opened = ActivationStore(store)
        windows = store_windows(opened, tokenizer)
        source = StoreSource(opened, site, windows)
    else:
        windows = token_windows(tokenizer, read_documents(corpus), context_size, tokens, seed=0)
        source = ModelSource(lm, site, windows, exclude_token_ids=excluded, name=model)
    meta = {"sae": str(Path(sae_path).resolve()), "model": model, "site": site}
    if sae.cfg.kind != "sae":  # a transcoder's latents read site (the pass encodes it) and write its out-site
        meta["out_site"] = sae.metadata.get("out_site")
    cache = collect_features(sae, source, out, config, progress=progress, meta=meta, overwrite=True)
    write_vocab(cache.path, tokenizer)
    cache = FeatureCache.load(cache.path)
    chosen = None
    if effects is not None:  # the best-looking first (the ones the table shows), then the most frequent
        ranked = ranked_latents(cache)
        count = cache.tensors["count"]
        rest = sorted(set(range(cache.d_sae)) - set(ranked), key=lambda j: (-int(count[j]), j))
        chosen = sorted((ranked + rest)[:effects])
    measure_effects(cache, lm, site, sae, windows, chosen, exclude_token_ids=excluded, progress=progress)
    measured = load_effects(cache.path)
    logit_ids = None
    if measured is not None and "logits.top_ids" in measured:
        logit_ids = torch.cat([measured["logits.top_ids"], measured["logits.bottom_ids"]])
    write_vocab(cache.path, tokenizer, logit_ids)
    return FeatureCache.load(cache.path)


def run_browse(cache_dir: str | Path, out: str | Path | None = None, *, show: int = 5,
               progress: bool = True) -> tuple[Path, str]:
    """Write the browser of a feature cache (default into <cache_dir>/browser); returns the path of its
    index.html and a markdown table of the `show` best-looking features by the one-token score."""
    index = write_browser(cache_dir, out, progress=progress)
    return index, top_features_table(FeatureCache.load(cache_dir), show, browser_dir=index.parent)


def build_and_browse(sae_path: str | Path, out: str | Path, *, show: int = 5, **kwargs) -> tuple[Path, str]:
    """run_features(sae_path, out, **kwargs), then run_browse(out): (index.html, the table)."""
    run_features(sae_path, out, **kwargs)
    return run_browse(out, show=show, progress=kwargs.get("progress", True))
