"""Automatic interpretation: explain, simulate and score features with a language model.

The front (each name imported when first used):

    run_autointerp(sae=... | examples=..., backend="openai:URL")   `fastsae autointerp` as a function
    score_features(features, backend, out)   explain and score given features, write the report
    parse_backend(spec), Backend, BackendError   "local:NAME" or "openai:URL" as a backend; its interface
    load_examples, save_examples             features' contexts as a JSON file any tool can write
    FeatureExamples, AutointerpConfig        one feature's contexts; what is scored and how
    interpret_feature, interpret_many        one feature through all of it; many in parallel

One file per part:

    scoring.py            the numbers: simulation correlation, accuracy / balanced accuracy / AUROC (no model here)
    llm_prompts.py        how contexts are shown and the prompts of the explainer, the simulator and the judges
    llm_backends.py       the one interface every language model has, and what its calls return
    local_llm.py          a local transformers model behind it
    openai_client.py      an OpenAI-compatible HTTP server behind it (openai_answers.py reads its answers
                          defensively, http_deadline.py bounds each request in wall-clock time)
    request_cache.py      every request on disk (resume, free reruns)
    explain.py            the explainer (Bills et al. 2023)
    simulate.py           the simulator and its three ways of reading predictions
    judge.py              detection and fuzzing (Paulo et al. 2024)
    interpret.py          one feature through all of it; many in parallel
    context_sources.py    features from an examples file or the feature cache (SAE and baselines)
    autointerp_report.py  summary table, plot, browser annotations
    autointerp_run.py     `fastsae autointerp` as a function
"""

from .. import lazy_front

__all__ = ["AutointerpConfig", "Backend", "BackendError", "FeatureExamples", "interpret_feature",
           "interpret_many", "load_examples", "parse_backend", "run_autointerp", "save_examples", "score_features"]
__getattr__, __dir__ = lazy_front(__name__, {
    "run_autointerp": "autointerp_run", "score_features": "autointerp_run", "parse_backend": "autointerp_run",
    "Backend": "llm_backends", "BackendError": "llm_backends", "load_examples": "context_sources",
    "save_examples": "context_sources", "FeatureExamples": "interpret", "AutointerpConfig": "interpret",
    "interpret_feature": "interpret", "interpret_many": "interpret",
})
