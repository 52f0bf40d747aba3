"""Reading features: the feature pass and its cache on disk, per-latent top contexts, measured effects on the
model, context attribution, ranking, and the static HTML browser with its assets.

The front (each name imported when first used):

    run_features(sae_dir, out)          `fastsae features`: the feature cache of a trained SAE, with its effects
    run_browse(cache_dir)               `fastsae browse`: the browser of a cache -> (index.html, the top table)
    build_and_browse(sae_dir, out)      both, what `fastsae run` ends with
    collect_features(sae, source, out)  the streaming pass itself, over a StoreSource or a ModelSource
    FeatureConfig, FeatureCache         its settings; the cache read back (top contexts, samples, statistics)
    Example                             one feature's activations on one context, as every tool shares them
    measure_effects, write_browser      effects on the model; the browser of a cache
    ranked_latents, top_features_table  the best-looking features by the one-token score
"""

from .. import lazy_front

__all__ = ["Example", "FeatureCache", "FeatureConfig", "ModelSource", "StoreSource", "build_and_browse",
           "collect_features", "measure_effects", "ranked_latents", "run_browse", "run_features",
           "top_features_table", "write_browser"]
__getattr__, __dir__ = lazy_front(__name__, {
    "run_features": "features_run", "run_browse": "features_run", "build_and_browse": "features_run",
    "collect_features": "feature_pass", "FeatureConfig": "feature_pass", "FeatureCache": "feature_cache",
    "StoreSource": "activation_chunks", "ModelSource": "activation_chunks", "Example": "feature_contexts",
    "measure_effects": "cache_effects", "write_browser": "browser_site", "ranked_latents": "ranking",
    "top_features_table": "ranking",
})
