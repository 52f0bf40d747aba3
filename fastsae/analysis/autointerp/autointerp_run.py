"""`fastsae autointerp` as a function: features (SAE latents and baseline directions, as contexts) + a
language-model backend -> report.json, summary.md, scores.png, and browser annotations.

    features = load_examples("examples.json")              # or from the feature cache (context_sources.py)
    backend = parse_backend("openai:http://127.0.0.1:8000/v1", model="llama-3.1-8b")
    score_features(features, backend, "runs/autointerp")

Every request goes through the disk cache (request_cache.py): a killed run, started again, resumes where it
stopped, and a finished one reruns for free.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from ... import io
from .autointerp_report import format_table, plot_scores, summarize_kinds, write_annotations
from .interpret import AutointerpConfig, FeatureExamples, interpret_many
from .llm_backends import Backend
from .request_cache import CachedBackend

FORMAT_VERSION = 1
WEAK_EXPLAINERS = {"gemma-3-270m": "Gemma 3 270M is a 270M-parameter base model, far below the GPT-4-class "
                                   "explainers of Bills et al. 2023 and Paulo et al. 2024: its explanations are "
                                   "often generic or copied from the prompt and its simulations near-constant, so "
                                   "its scores are a floor on interpretability and a test of the pipeline, not a "
                                   "measure of the features. It can show that the pipeline runs end to end and "
                                   "whether SAE latents beat random directions by a margin it can detect; it "
                                   "cannot show how interpretable the features are, nor rank SAE against PCA, ICA "
                                   "or neurons when every kind scores near chance. Use an OpenAI-compatible server "
                                   "with a large model "
                                   "for numbers to compare with the literature."}


def _default_cache() -> Path:
    from ...model import cache_dir

    return cache_dir() / "autointerp"


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    out["cpus"] = os.cpu_count()
    return out


def score_features(features: dict[str, FeatureExamples], backend: Backend, out: str | Path, *,
                   cfg: AutointerpConfig | None = None, cache: str | Path | None = None, price_in: float = 0.0,
                   price_out: float = 0.0, feature_cache: str | Path | None = None, progress: bool = True,
                   meta: dict | None = None) -> dict:
    """Explain and score features ({"sae/12": FeatureExamples, "pca/3": …}) and write the report in out.
    price_in / price_out: dollars per million prompt / completion tokens, for the cost estimate.
    feature_cache: the SAE's feature-cache directory; its latents' explanations become annotations."""
    if not features:
        raise ValueError("features: nothing to interpret")
    cfg = cfg or AutointerpConfig()
    out = Path(out)
    cached = CachedBackend(backend, cache or _default_cache())

    def describe() -> str:
        u = cached.usage
        tokens = u.prompt_tokens + u.completion_tokens
        cost = f", ${u.cost(price_in, price_out):.4f}" if price_in or price_out else ""
        return f"{tokens / 1000:.1f}k tokens{cost}, {u.requests} asked, {u.cached} cached"

    start = time.perf_counter()
    results = interpret_many(cached, features, cfg, progress=progress, describe=describe)
    seconds = time.perf_counter() - start
    report = _report(results, backend, cached, cfg, seconds, price_in, price_out, meta)
    io.write_json(out / "report.json", report)
    table = format_table(report["summary"])
    lines = _summary_lines(report, table, seconds, cached.usage, price_in, price_out)
    io.atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    files = [out / "report.json", out / "summary.md"]
    plot = plot_scores(out / "scores.png", results)
    if plot is not None:
        files.append(plot)
    if feature_cache is not None:  # a plain path: the browser keeps only http(s) and relative links live
        files.append(write_annotations(feature_cache, results, backend.model,
                                       href=str((out / "report.json").resolve())))
    print(table)
    print("\n".join(lines[4:]))
    print("report: " + ", ".join(str(f.resolve()) for f in files))
    return report


def _report(results: list, backend: Backend, cached: CachedBackend, cfg: AutointerpConfig, seconds: float,
            price_in: float, price_out: float, meta: dict | None) -> dict:
    """report.json: the run's provenance and usage, the summary per kind, and every feature's result."""
    u = cached.usage
    report = {
        "format_version": FORMAT_VERSION,
        "meta": {"backend": backend.name, "model": backend.model,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "config": {**dataclasses.asdict(cfg), "scores": list(cfg.scores)},
                 "seconds": round(seconds, 2), "features": len(results),
                 "features_per_minute": round(60 * len(results) / seconds, 3) if seconds > 0 else None,
                 "usage": {**dataclasses.asdict(u), "cost_usd": u.cost(price_in, price_out),
                           "price_per_million_tokens": {"prompt": price_in, "completion": price_out}},
                 "cache": str(Path(cached.directory).resolve()), "versions": _versions(), **(meta or {})},
        "summary": summarize_kinds(results),
        "features": results,
    }
    if backend.model in WEAK_EXPLAINERS or Path(backend.model).name in WEAK_EXPLAINERS:
        report["meta"]["explainer_note"] = WEAK_EXPLAINERS.get(backend.model) or WEAK_EXPLAINERS[Path(
            backend.model).name]
    return report


def _summary_lines(report: dict, table: str, seconds: float, u, price_in: float, price_out: float) -> list[str]:
    """summary.md, line by line: the table, then speed, requests and cost (and the weak-explainer note)."""
    lines = [f"# Autointerp: {report['meta']['model']} via {report['meta']['backend']}", "", table, "",
             f"{len(report['features'])} features in {seconds:.1f} s ({report['meta']['features_per_minute']} "
             "per minute); "
             f"{u.requests} requests to the model, {u.cached} from the cache; "
             f"{u.prompt_tokens + u.completion_tokens:,} tokens spent"
             + (f", about ${u.cost(price_in, price_out):.4f}" if price_in or price_out else "") + "."]
    lines += ["", "Two simulation protocols: the table's \"simulation\" is stratified (held-out quantile samples "
              "plus non-activating random contexts); \"top-and-random\" is the seed's (held-out top contexts plus "
              "unfiltered random ones, Bills et al. 2023). Kind \"random\": random unit directions, read by "
              "projection (the floor)."]
    for kind, s in report["summary"].items():
        if "simulation_top_and_random" in s:
            t = s["simulation_top_and_random"]
            lines.append(f"- {kind}: top-and-random simulation {t['mean']:.3f} (n {t['n']})")
    if "explainer_note" in report["meta"]:
        lines += ["", report["meta"]["explainer_note"]]
    return lines


def parse_backend(spec: str, model: str | None = None, **kwargs) -> Backend:
    """`local[:NAME]` (default gemma-3-270m) or `openai[:URL]` (URL default $OPENAI_BASE_URL; model default
    $OPENAI_MODEL). kwargs go to the backend (device for local; concurrency, timeout, … for openai)."""
    kind, _, where = spec.partition(":")
    if kind == "local":
        from .local_llm import LocalBackend

        kwargs = {k: v for k, v in kwargs.items() if k == "device"}
        return LocalBackend(where or model or "gemma-3-270m", **kwargs)
    if kind == "openai":
        from .openai_client import OpenAIBackend

        url = where or os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise ValueError("--backend openai: give the server as openai:http://host:port/v1 or set $OPENAI_BASE_URL")
        kwargs.pop("device", None)
        return OpenAIBackend(url, model or os.environ.get("OPENAI_MODEL", ""), **kwargs)
    raise ValueError(f"--backend: expected local[:MODEL] or openai:URL, got {spec!r}")


def run_autointerp(*, backend: str = "local:gemma-3-270m", model: str | None = None, examples: str | Path | None = None,
               sae: str | Path | None = None, feature_cache_dir: str | Path | None = None,
               features: str | int | None = 50, fit_tokens: int = 32_768,
               baselines: tuple[str, ...] = ("pca", "ica", "neurons"), out: str | Path = "runs/autointerp",
               cache: str | Path | None = None, scores: tuple[str, ...] = ("simulation", "detection", "fuzzing"),
               api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4, timeout: float = 60.0, retries: int = 5,
               chat: bool = True, price_in: float = 0.0, price_out: float = 0.0, device: str = "cpu", seed: int = 0,
               progress: bool = True) -> dict:
    """The command line's function: the features of an examples file, or of an SAE and its baselines
    through the feature cache, explained and scored by the backend ("local:NAME" or "openai:URL")."""
    from .context_sources import interleave

    if (examples is None) == (sae is None):
        raise ValueError("give the features as --sae DIR (through its feature cache) or --examples FILE, not both")
    feature_cache = feature_cache_dir
    if examples is not None:
        chosen = _chosen_examples(examples, features, seed)
        source = {"examples": str(Path(examples).resolve())}
    else:
        from .context_sources import from_sae

        chosen, feature_cache, source = from_sae(sae, features, baselines, feature_cache=feature_cache_dir, out=out,
                                                 fit_tokens=fit_tokens, seed=seed, device=device, progress=progress)
    chosen = interleave(chosen)
    lm = parse_backend(backend, model, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                       max_retries=retries, chat=chat, device=device)
    cfg = AutointerpConfig(scores=tuple(scores), seed=seed)
    return score_features(chosen, lm, out, cfg=cfg, cache=cache, price_in=price_in, price_out=price_out,
                          feature_cache=feature_cache, progress=progress, meta={"source": source})


def _chosen_examples(examples: str | Path, features: str | int | None, seed: int) -> dict[str, FeatureExamples]:
    """The features of an examples file that `features` selects, per kind."""
    from .context_sources import load_examples, parse_name, select

    available = load_examples(examples)
    chosen: dict[str, FeatureExamples] = {}
    by_kind: dict[str, list[int]] = {}
    for name in available:
        kind, latent = parse_name(name)
        by_kind.setdefault(kind, []).append(latent)
    for kind, latents in by_kind.items():
        for latent in select(latents, features, seed):
            chosen[f"{kind}/{latent}"] = available[f"{kind}/{latent}"]
    return chosen
