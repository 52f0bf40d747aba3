"""Where a feature's contexts come from: an examples file (JSON, any tool can write one), or the feature
cache of `fastsae.analysis.features.feature_pass` (top contexts, quantile samples and random contexts per
latent).

Features are named `<kind>/<latent>`: kind "sae" for the dictionary's latents, "pca", "ica", "neurons" for
the baselines' directions and "random" for random unit directions in the site's activation space (their
activations are projections), so one report compares them on equal terms.
"""

from __future__ import annotations

import random
from pathlib import Path

from ... import io
from .interpret import FeatureExamples, feature_from_dict, feature_to_dict

FORMAT_VERSION = 1


def feature_name(kind: str, latent: int) -> str:
    return f"{kind}/{latent}"


def parse_name(name: str) -> tuple[str, int]:
    kind, _, latent = name.rpartition("/")
    if not kind or not latent.isdigit():
        raise ValueError(f"feature name: expected <kind>/<latent> such as sae/123, got {name!r}")
    return kind, int(latent)


def save_examples(path: str | Path, features: dict[str, FeatureExamples]) -> None:
    """{"format_version": 1, "features": {"sae/12": {"top": [Example], "samples": [...], "random": [...]}}}"""
    for name in features:
        parse_name(name)
    io.write_json(path, {"format_version": FORMAT_VERSION,
                         "features": {n: feature_to_dict(f) for n, f in features.items()}})


def load_examples(path: str | Path) -> dict[str, FeatureExamples]:
    data = io.read_json(path)
    if data.get("format_version") != FORMAT_VERSION or not isinstance(data.get("features"), dict):
        raise ValueError(f"{path}: expected an autointerp examples file (format_version {FORMAT_VERSION}, "
                         "'features': {name: {top, samples, random}})")
    out = {}
    for name, d in data["features"].items():
        parse_name(name)
        out[name] = feature_from_dict(d, f"{path}: feature {name}")
    return out


def select(latents: list[int], features: str | int | None, seed: int = 0) -> list[int]:
    """`features`: None or "all" (every latent given); a count N (N of them drawn at random with seed, in
    increasing order; N + M draws the same N and M more); or ids "3,17,42" (one id is written "42,")."""
    text = "all" if features is None else str(features).strip()
    if text == "all":
        return list(latents)
    if "," in text:
        try:
            ids = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--features: expected ids like 3,17,42; got {features!r}") from None
        missing = sorted(set(ids) - set(latents))
        if missing:
            raise ValueError(f"--features: latents {missing[:10]} have no contexts in the source")
        return ids
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--features: expected a count >= 1, ids like 3,17,42 (one id: 42,) or 'all'; "
                         f"got {features!r}")
    order = list(latents)
    random.Random(seed).shuffle(order)  # a prefix of one shuffle: asking for more features keeps the first ones
    return sorted(order[:int(text)])


def interleave(features: dict[str, FeatureExamples]) -> dict[str, FeatureExamples]:
    """The features with kinds taken in turn (sae/3, pca/1, ica/5, sae/9, …), so that a run stopped early has
    scored every kind alike."""
    by_kind: dict[str, list[str]] = {}
    for name in features:
        by_kind.setdefault(parse_name(name)[0], []).append(name)
    order = []
    for i in range(max((len(v) for v in by_kind.values()), default=0)):
        order += [names[i] for names in by_kind.values() if i < len(names)]
    return {name: features[name] for name in order}


# --- the feature cache (fastsae.analysis.features.feature_pass) ----------------------------------------------

RANDOM_CONTEXTS = 16  # random non-activating contexts read per feature (simulation 5, detection 10, explainer 2)


def from_feature_cache(cache, latents: list[int], kind: str = "sae", *, n_random: int = RANDOM_CONTEXTS,
                       seed: int = 0) -> dict[str, FeatureExamples]:
    """FeatureExamples of the given latents of a FeatureCache: its top contexts, quantile samples, random
    contexts where the latent is off (drawn with seed + latent, so each feature gets its own), and unfiltered
    random contexts for the top-and-random score."""
    return {feature_name(kind, j): FeatureExamples(cache.top(j), cache.samples(j),
                                                   cache.random_examples(j, n_random, seed=seed + j,
                                                                         nonactivating=True),
                                                   cache.random_examples(j, n_random, seed=seed + j + 7919))
            for j in latents}


def alive(cache) -> list[int]:
    """Latents that fired in the cache's pass (the others have no contexts to explain)."""
    return [j for j, c in enumerate(cache.tensors["count"].tolist()) if c > 0]


def from_sae(sae_path: str | Path, features: str | int | None, baselines: tuple[str, ...] = ("pca", "ica", "neurons"),
             *, feature_cache: str | Path | None = None, out: str | Path, fit_tokens: int = 32_768, seed: int = 0,
             device: str = "cpu", progress: bool = True) -> tuple[dict[str, FeatureExamples], Path, dict]:
    """The SAE's features and its baselines' through the feature cache, on equal terms: the same store, the
    same pass (`collect_features`), the same number of contexts. Baselines (fastsae.evaluation.baselines)
    are fitted on the store's first fit_tokens activations with the SAE's L0 as their k, and read with
    both signs as features (`SplitSigns`: a direction's negative side is a feature as much as its positive).
    Caches of an earlier run for the same SAE and settings are reused, without fitting the baselines again.

    feature_cache: an existing cache of this SAE (its browser then shows the explanations); default: the
    main job's (`fastsae run` leaves <run>/features beside <run>/train/sae) when it is this SAE's, else one
    is built (resumably) in <out>/features/sae. Returns (features, the SAE's cache directory, provenance)."""
    from ...sae import SAE
    from ..features.feature_cache import FeatureCache

    caches = _SaeCaches(SAE.load(sae_path, device=device), sae_path, seed, progress)
    out = Path(out)
    feature_cache = feature_cache if feature_cache is not None else _main_job_cache(sae_path)
    sae_dir = Path(feature_cache) if feature_cache is not None else out / "features" / "sae"
    if feature_cache is not None:
        sae_cache = FeatureCache.load(sae_dir)
    else:
        sae_cache = caches.build(caches.sae, sae_dir, {"sae": str(Path(sae_path).resolve())})
    chosen = from_feature_cache(sae_cache, select(alive(sae_cache), features, seed), "sae", seed=seed)
    provenance = {"sae": str(Path(sae_path).resolve()), "feature_cache": str(sae_dir.resolve()),
                  "store": str(caches.store.path.resolve()), "site": caches.site, "baselines": {}}
    fit = _BaselineFit(caches, fit_tokens, seed, device)
    for kind in baselines:
        directory = out / "features" / kind
        cache = fit.cache(kind, directory)
        chosen.update(from_feature_cache(cache, select(alive(cache), features, seed), kind, seed=seed))
        provenance["baselines"][kind] = {"k": cache.meta["meta"]["k"], "directions": cache.d_sae // 2,
                                         "features": cache.d_sae, "fit_tokens": fit_tokens,
                                         "cache": str(directory.resolve())}
    return chosen, sae_dir, provenance


def _main_job_cache(sae_path: str | Path) -> Path | None:
    """The main job's feature cache beside the SAE (<run>/features for <run>/train/sae), when it is this SAE's."""
    beside = Path(sae_path).resolve().parent.parent / "features"
    if (beside / "features.json").is_file() and \
            io.read_json(beside / "features.json").get("meta", {}).get("sae") == str(Path(sae_path).resolve()):
        return beside
    return None


class _SaeCaches:
    """Feature caches of decompositions read on the SAE's activation store, each marked with the SAE's fingerprint
    so that a later run for the same SAE finds them; the model's tokenizer is loaded on the first pass run."""

    def __init__(self, sae, sae_path: str | Path, seed: int, progress: bool):
        from ...harvest.store import ActivationStore, is_store
        from ..decompositions import fingerprint

        store_path = sae.metadata.get("store")
        if not store_path or not is_store(store_path):
            raise ValueError(f"--sae {sae_path}: autointerp reads the SAE's activation store (recorded when it was "
                             f"trained on one), and {store_path!r} is not one; train on a store (fastsae harvest)")
        self.sae, self.store, self.site = sae, ActivationStore(store_path), sae.metadata.get("site")
        self.sae_id, self.seed, self.progress = fingerprint(sae), seed, progress
        self._tokenizer = self._source = None

    def finished(self, directory: Path):
        """The cache in directory when a finished pass of this SAE's run left it there, else None."""
        from ..features.feature_cache import FeatureCache

        if (directory / "features.json").is_file() and (directory / "vocab.json").is_file():
            cache = FeatureCache.load(directory)
            if cache.meta.get("meta", {}).get("sae_fingerprint") == self.sae_id:
                return cache
        return None

    def build(self, decomposition, directory: Path, meta: dict):
        """decomposition's cache in directory: the finished one there when it is of decomposition, else a pass."""
        from ...model import load
        from ..decompositions import fingerprint
        from ..features.activation_chunks import StoreSource, store_windows
        from ..features.feature_cache import FeatureCache, write_vocab
        from ..features.feature_pass import FeatureConfig, collect_features

        done = self.finished(directory)
        if done is not None and done.meta["decomposition"] == fingerprint(decomposition):
            return done
        meta = {**meta, "sae_fingerprint": self.sae_id}
        if self._source is None:
            _, self._tokenizer = load(self.store.meta["model"], device="cpu")
            self._source = StoreSource(self.store, self.site, store_windows(self.store, self._tokenizer))
        cache = collect_features(decomposition, self._source, directory, FeatureConfig(seed=self.seed),
                                 progress=self.progress, meta=meta)
        write_vocab(cache.path, self._tokenizer)
        return FeatureCache.load(cache.path)


class _BaselineFit:
    """Baselines fitted on the store's first fit_tokens activations (read once, on the first fit) with the SAE's
    L0 as their k, each passed as a SplitSigns feature cache."""

    def __init__(self, caches: _SaeCaches, fit_tokens: int, seed: int, device: str):
        self.caches, self.fit_tokens, self.seed, self.device = caches, fit_tokens, seed, device
        self._x = self._k = None

    def cache(self, kind: str, directory: Path):
        """The baseline's feature cache in directory: one fitted and passed before for this SAE and settings (ICA
        takes minutes to fit again), else fitted and passed now."""
        from ...evaluation import baselines as fit_baselines
        from ...evaluation.evaluate import matched_k
        from ..decompositions import SplitSigns

        settings = {"baseline": kind, "fit_tokens": self.fit_tokens, "seed": self.seed, "signs": "split"}
        cache = self.caches.finished(directory)
        if cache is not None and all(cache.meta["meta"].get(key) == v for key, v in settings.items()):
            return cache
        sae = self.caches.sae
        if self._x is None:
            self._x = self.caches.store.first_rows(self.caches.site, self.fit_tokens).float()
            self._k = matched_k(sae, self._x.to(self.device))
        decomposition = fit_baselines.fit(kind, self._x, n=sae.cfg.d_sae, k=self._k, seed=self.seed)
        if kind == "random":  # random unit directions read by projection (x - mean)·d, not a pseudo-inverse
            decomposition = fit_baselines.Decomposition("random", decomposition.directions,
                                                        decomposition.directions, decomposition.mean, self._k)
        return self.caches.build(SplitSigns(decomposition), directory, {**settings, "k": self._k})
