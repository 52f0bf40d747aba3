"""`fastsae compare` as a function: two dictionaries -> comparison.json, a histogram of max cosines,
the feature-splitting families when the sizes differ, and browser annotations linking matched features (and,
across sizes, each latent to its parent and children: fastsae.analysis.compare.family_links).

A dictionary is named by a spec:
    runs/x/sae            an SAE directory (cfg.json + sae.safetensors)
    toy  /  toy:SEED      the toy's ground-truth features (fastsae.toy.ToyDictionary.random(seed=SEED))
    pca:STORE / ica:STORE PCA / ICA directions fitted on an activation store (site: --site, or the store's
                          only one, or the other dictionary's)
    dirs.npy / .safetensors   any (n, d_in) array of directions (a .safetensors file holding one tensor)

With a store of held-out tokens (--correlation-store), two SAEs are also matched by activation correlation
(fastsae.analysis.compare.activation_correlation): each latent's best Pearson r with the other's latents.

Top tokens (for whether a feature's family partitions its top tokens) come from feature caches when
given (fastsae.analysis.features.feature_pass), else from an activation store both SAEs were trained at.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from ... import io
from ..features.browser_links import default_browser, feature_href
from ..features.feature_contexts import Example
from .direction_match import Comparison, compare, splits
from .family_links import name_slug as _slug  # long names end in a hash: two dictionaries never share a file
from .family_links import write_family_annotations

ANNOTATION_TOOL = "compare"
# A family "partitions" its parent's top tokens when its children cover >= 80% of the parent's top-token
# mass and >= 80% of that is claimed by exactly one child: a rule of thumb, the numbers are reported too.
PARTITION_COVERAGE = 0.8
PARTITION_EXCLUSIVE = 0.8
TOP_EXAMPLES = 20  # top contexts per feature whose tokens count (the feature cache's default n)


# ---- dictionaries ------------------------------------------------------------------------------------

def load_dictionary(spec: str, *, site: str | None = None, fit_tokens: int = 32_768, device: str = "cpu"):
    """The dictionary a spec names (see the module docstring)."""
    from ...sae import CONFIG_FILE, SAE

    if spec == "toy" or spec.startswith("toy:"):
        from ...toy import ToyDictionary

        seed = spec.partition(":")[2]
        if seed and not seed.isdigit():
            raise ValueError(f"{spec!r}: the toy's seed must be an integer (toy:SEED)")
        return ToyDictionary.random(seed=int(seed or 0))
    if spec.startswith(("pca:", "ica:")):
        return _baseline(spec[:3], spec[4:], site, fit_tokens)
    path = Path(spec)
    if (path / CONFIG_FILE).is_file():
        return SAE.load(path, device=device)
    if path.suffix == ".npy" and path.is_file():
        import numpy as np

        return torch.from_numpy(np.array(io.read_npy(path)))  # header checked: a truncated file says so
    if path.suffix == ".safetensors" and path.is_file():
        tensors = io.read_tensors(path)
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one (n, d_in) tensor of directions, found {sorted(tensors)}")
        return next(iter(tensors.values()))
    raise ValueError(f"{spec!r} is not an SAE directory, 'toy[:SEED]', 'pca:STORE', 'ica:STORE', or an "
                     f".npy/.safetensors file of directions")


def _baseline(kind: str, store_path: str, site: str | None, fit_tokens: int):
    from ...evaluation.baselines import fit
    from ...harvest import ActivationStore

    store = ActivationStore(store_path)
    if site is None:
        if len(store.sites) != 1:
            raise ValueError(f"{kind}:{store_path} holds sites {sorted(store.sites)}: name one with --site")
        site = next(iter(store.sites))
    return fit(kind, store.first_rows(site, fit_tokens).float(), store.sites[site], 1)


def describe(spec: str, d) -> str:
    from ...sae import SAE

    if isinstance(d, SAE):
        return f"{spec} ({d.cfg.activation}, d_sae {d.cfg.d_sae})"
    return spec


# ---- top tokens and partitions ----------------------------------------------------------------------

def top_tokens(examples: list[Example]) -> Counter:
    """How often each token is the one a feature peaks on, over its top examples."""
    return Counter(ex.tokens[max(range(len(ex.activations)), key=ex.activations.__getitem__)]
                   for ex in examples if ex.activations)


def token_partition(parent: Counter, children: list[Counter]) -> dict:
    """Do the children's top tokens split the parent's between them?
    coverage: share of the parent's top-token mass on tokens that are top tokens of some child;
    exclusive: share of that covered mass on tokens claimed by exactly one child."""
    total = sum(parent.values())
    owners = Counter(t for child in children for t in child)
    covered = sum(c for t, c in parent.items() if owners[t] >= 1)
    exclusive = sum(c for t, c in parent.items() if owners[t] == 1)
    coverage = covered / total if total else 0.0
    exclusive_share = exclusive / covered if covered else 0.0
    return {"coverage": round(coverage, 4), "exclusive": round(exclusive_share, 4),
            "partitions": coverage >= PARTITION_COVERAGE and exclusive_share >= PARTITION_EXCLUSIVE}


def cache_example_reader(cache_dir: str | Path) -> Callable[[int], list[Example]]:
    """A feature's top examples from a feature cache (fastsae.analysis.features.feature_pass)."""
    from ..features.feature_cache import FeatureCache

    return FeatureCache.load(cache_dir).top


def is_feature_cache(path: str | Path | None) -> bool:
    from ..features.feature_cache import META_FILE

    return bool(path) and (Path(path) / META_FILE).is_file()


def store_example_reader(sae, store, tokenizer) -> Callable[[int], list[Example]]:
    """A feature's top examples straight from an activation store (one encoding pass over it)."""
    from ..features.store_contexts import StoreContexts, encode_store, top_rows

    codes = encode_store(sae, store, sae.metadata.get("site") or next(iter(store.sites)))
    contexts = StoreContexts(store, tokenizer)
    return lambda latent: contexts.examples(codes, latent, top_rows(codes, latent, TOP_EXAMPLES))


# ---- report -----------------------------------------------------------------------------------------

def _rounded(t: torch.Tensor) -> list:
    return [round(v, 4) for v in t.tolist()] if t.is_floating_point() else t.tolist()


def _side(max_cos, best, sign, absolute: bool) -> dict:
    side = {"max_cos": _rounded(max_cos), "best": best.tolist()}
    if absolute:
        side["sign"] = sign.tolist()
    return side


def write_annotations(cache_dir: str | Path, other_name: str, max_cos, best, sign, tau: float,
                      other_browser: str | Path | None, absolute: bool, browser: str | Path | None = None) -> Path:
    """<cache_dir>/annotations/compare-<other>.json: each feature's best match in the other dictionary, linked
    to its page in other_browser, relative to this cache's browser (by default <cache_dir>/browser)."""
    features = {}
    for i, (c, j, s) in enumerate(zip(max_cos.tolist(), best.tolist(), sign.tolist(), strict=True)):
        flipped = " (flipped)" if absolute and s < 0 else ""
        mark = "matched" if c >= tau else "no match"
        entry = {"text": f"{mark} in {other_name}: best is latent {j}, cos {c:.3f}{flipped} (tau {tau})"}
        href = feature_href(other_browser, browser or default_browser(cache_dir), j)
        if href:
            entry["links"] = [{"text": f"latent {j} (cos {c:.2f})", "href": href}]
        features[str(i)] = entry
    path = Path(cache_dir) / "annotations" / f"{ANNOTATION_TOOL}-{_slug(other_name)}.json"
    io.write_json(path, {"title": f"Best match in {other_name}", "features": features})
    return path


def write_histogram(path: Path, cmp: Comparison, names: tuple[str, str]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lo = min(0.0, float(cmp.max_ab.min()), float(cmp.max_ba.min()))
    bins = torch.linspace(lo, 1.0, 51).tolist()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.hist(cmp.max_ab.numpy(), bins=bins, alpha=0.6, label=f"A → B  (MMCS {cmp.mmcs_ab:.3f})")
    ax.hist(cmp.max_ba.numpy(), bins=bins, alpha=0.6, label=f"B → A  (MMCS {cmp.mmcs_ba:.3f})")
    ax.axvline(cmp.tau, color="k", ls="--", lw=1, label=f"τ = {cmp.tau}")
    ax.set_xlabel(("|cos|" if cmp.absolute else "cos") + " with the best match in the other dictionary")
    ax.set_ylabel("directions")
    ax.set_yscale("log")
    ax.set_title(f"A: {names[0]}\nB: {names[1]}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def run_compare(a: str, b: str, out: str | Path, *, tau: float = 0.9, absolute: bool | None = None,
                one_to_one: bool = False, split_tau: float = 0.5, site: str | None = None,
                caches: tuple[str | None, str | None] = (None, None),
                browsers: tuple[str | None, str | None] = (None, None), store: str | None = None,
                device: str | None = None, correlation_store: str | None = None,
                correlation_tokens: int = 16_384) -> dict:
    """Compare dictionaries a and b (specs); write out/comparison.json and out/max_cos.png, and when feature
    caches are given, annotations linking each feature to its best match in the other browser (whose
    feature pages live at <browser>/feature.html, by default <other cache>/browser). With correlation_store
    (two SAEs only), also each latent's best activation correlation over that store's first correlation_tokens
    rows (fastsae.analysis.compare.activation_correlation)."""
    from ...sae import SAE

    out = Path(out)
    da = load_dictionary(a, site=site)
    # a baseline beside a transcoder is fitted where its decoder directions live: its out-site
    db = load_dictionary(b, site=site or (da.metadata.get("out_site") or da.metadata.get("site")
                                          if isinstance(da, SAE) else None))
    names = (describe(a, da), describe(b, db))
    if correlation_store and not (isinstance(da, SAE) and isinstance(db, SAE)):
        raise ValueError(f"--correlation-store needs two SAEs (it encodes tokens with each), got {names[0]} and "
                         f"{names[1]}")
    if correlation_store:  # checked before the comparison runs, not after
        store_of_codes, correlation_site = _correlation_site(da, db, correlation_store, site)
    cmp = compare(da, db, tau=tau, absolute=absolute, one_to_one_matching=one_to_one, device=device)
    report = _matches(cmp, names)
    if cmp.max_ab.shape[0] != cmp.max_ba.shape[0] and isinstance(da, SAE) and isinstance(db, SAE):
        report["splits"] = _splits(cmp, da, db, split_tau, caches, store)
    if correlation_store:
        report["activation_correlation"] = _correlation(da, db, store_of_codes, correlation_site, correlation_tokens,
                                                        tau, device)
    files = [out / "comparison.json"]
    hist = write_histogram(out / "max_cos.png", cmp, names)
    if hist:
        files.append(hist)
    files += _annotate(cmp, report, names, tau, caches, browsers)
    io.write_json(out / "comparison.json", report)
    _print_summary(report, names, tau, split_tau, files)
    return report


def _matches(cmp: Comparison, names: tuple[str, str]) -> dict:
    """The report's cosine part: the summary, each side's best matches, the mutual (and one-to-one) pairs."""
    report = {"a": names[0], "b": names[1], "summary": cmp.summary(),
              "a_to_b": _side(cmp.max_ab, cmp.best_ab, cmp.sign_ab, cmp.absolute),
              "b_to_a": _side(cmp.max_ba, cmp.best_ba, cmp.sign_ba, cmp.absolute)}
    rows, cols, cos = cmp.mutual_pairs()
    report["mutual_pairs"] = {"a": rows.tolist(), "b": cols.tolist(), "cos": _rounded(cos)}
    if cmp.assignment is not None:
        rows, cols, cos = cmp.assignment
        report["one_to_one"] = {"a": rows.tolist(), "b": cols.tolist(), "cos": _rounded(cos)}
    return report


def _annotate(cmp: Comparison, report: dict, names: tuple[str, str], tau: float, caches, browsers) -> list[Path]:
    """Each cache's browser annotations: the best match in the other dictionary, and across sizes the family."""
    files = []
    browsers = tuple(b or default_browser(c) for b, c in zip(browsers, caches, strict=True))
    for side, (cache, other_browser, other_name) in enumerate(((caches[0], browsers[1], names[1]),
                                                              (caches[1], browsers[0], names[0]))):
        if cache:
            mx, best, sign = ((cmp.max_ab, cmp.best_ab, cmp.sign_ab) if side == 0 else
                              (cmp.max_ba, cmp.best_ba, cmp.sign_ba))
            files.append(write_annotations(cache, other_name, mx, best, sign, tau, other_browser, cmp.absolute,
                                           browsers[side]))
    if "splits" in report:
        files += write_family_annotations(report["splits"], names, caches, browsers)
    return files


def _print_summary(report: dict, names: tuple[str, str], tau: float, split_tau: float, files: list[Path]) -> None:
    summary = report["summary"]
    print(f"A: {names[0]}\nB: {names[1]}\nMMCS A→B {summary['mmcs_ab']:.4f}, B→A {summary['mmcs_ba']:.4f}; "
          f"{summary['frac_a_matched']:.1%} of A and {summary['frac_b_matched']:.1%} of B have a match ≥ {tau} "
          f"({summary['cosine']}); {summary['mutual_pairs']} mutual best pairs")
    if "activation_correlation" in report:
        c = report["activation_correlation"]["summary"]
        print(f"activation correlation on {c['tokens']:,} tokens of {c['site']}: mean max r A→B "
              f"{c['mean_max_corr_ab']:.4f}, B→A {c['mean_max_corr_ba']:.4f}; {c['frac_a_matched']:.1%} of A's "
              f"{c['live_a']} and {c['frac_b_matched']:.1%} of B's {c['live_b']} live latents have r ≥ {tau} "
              f"(dead: {c['dead_a']} in A, {c['dead_b']} in B)")
    if "splits" in report:
        s = report["splits"]["summary"]
        print(f"feature splitting (cos ≥ {split_tau}): {s['split']} of {s['small_features']} small features split "
              f"into ≥ 2 large ones, mean family size {s['mean_family_size']:.2f}")
    print("written: " + ", ".join(str(f) for f in files))


def _correlation_site(da, db, store_path: str, site: str | None):
    """(the store, the site) of the activation correlation: --site, else the SAEs' own (which must agree), else
    the store's only one."""
    from ...harvest import ActivationStore
    from .activation_correlation import check_site

    st = ActivationStore(store_path)
    if site is None:
        own = {s for s in (da.metadata.get("site"), db.metadata.get("site")) if s}
        if len(own) > 1:
            raise ValueError(f"the SAEs were trained at different sites {sorted(own)}: name one with --site")
        if not own and len(st.sites) != 1:
            raise ValueError(f"{store_path} holds sites {sorted(st.sites)}: name one with --site")
        site = own.pop() if own else next(iter(st.sites))
    check_site(st, site)
    return st, site


def _correlation(da, db, st, site: str, tokens: int, tau: float, device) -> dict:
    """The activation-correlation part of comparison.json, over st's first rows of site."""
    from .activation_correlation import correlation_on_store

    corr = correlation_on_store(da, db, st, site, tokens, tau=tau, device=device)
    nulls = lambda t: [None if math.isnan(v) else round(v, 4) for v in t.tolist()]  # dead latents: no r
    return {"summary": {**corr.summary(), "site": site, "store": str(st.path)},
            "a_to_b": {"max_corr": nulls(corr.max_ab), "best": corr.best_ab.tolist()},
            "b_to_a": {"max_corr": nulls(corr.max_ba), "best": corr.best_ba.tolist()}}


def _splits(cmp: Comparison, da, db, tau: float, caches, store: str | None) -> dict:
    small = "a" if cmp.max_ab.shape[0] < cmp.max_ba.shape[0] else "b"
    families = splits(cmp, small=small, tau=tau)
    sizes = [len(f["children"]) for f in families]
    split = [f for f in families if len(f["children"]) >= 2]
    examples = _examples_sources(da, db, caches, store) if split else None
    if examples is not None:
        small_ex, large_ex = examples if small == "a" else examples[::-1]
        for f in split:
            f["top_tokens"] = [t for t, _ in top_tokens(small_ex(f["feature"])).most_common(5)]
            children = [top_tokens(large_ex(j)) for j in f["children"]]
            f["children_top_tokens"] = [[t for t, _ in c.most_common(3)] for c in children]
            f.update(token_partition(top_tokens(small_ex(f["feature"])), children))
    summary = {"small": small, "tau": tau, "small_features": len(families), "split": len(split),
               "with_family": sum(s >= 1 for s in sizes),
               "mean_family_size": sum(sizes) / max(1, sum(s >= 1 for s in sizes))}
    if examples is not None and split:
        summary["partitioning_families"] = sum(bool(f.get("partitions")) for f in split)
    return {"summary": summary, "families": [f for f in families if f["children"]]}


def _examples_sources(da, db, caches, store: str | None):
    """(examples of A's features, examples of B's) from feature caches, else from a store, else None."""
    if is_feature_cache(caches[0]) and is_feature_cache(caches[1]):
        return cache_example_reader(caches[0]), cache_example_reader(caches[1])
    # caches named only for the annotations (not built yet): top tokens come from the store
    from ...harvest import ActivationStore, is_store
    from ...model import load

    store_path = store or da.metadata.get("store")
    if not store_path or not is_store(store_path):
        return None

    st = ActivationStore(store_path)
    try:
        tokenizer = load(st.meta["model"])[1]
    except Exception:  # the model is not here: tokens are shown as ids
        tokenizer = None
    return store_example_reader(da, st, tokenizer), store_example_reader(db, st, tokenizer)
