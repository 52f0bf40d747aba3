"""One feature through explain -> simulate -> score, detection and fuzzing; many features in parallel
(as many in flight as the backend allows) with a progress bar of tokens spent and their cost.

A feature comes as plain lists of `Example`s (`FeatureExamples`): its top-activating contexts (largest
first), its stratified quantile samples, and random contexts. The explainer sees the top contexts and a
few random ones; everything it is scored on is held out from what it saw.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from ..features.feature_contexts import Example
from .explain import explain
from .judge import detection, fuzzing
from .llm_backends import Backend
from .llm_prompts import focus
from .scoring import simulation_score
from .simulate import simulate


@dataclass
class AutointerpConfig:
    explain_top: int = 10  # top-activating contexts shown to the explainer (Bills et al.: 5 of the top 20)
    explain_random: int = 2  # random contexts shown to it too, so it sees what the feature ignores
    simulate_active: int = 5  # held-out activating contexts the simulator predicts (quantile samples)
    simulate_random: int = 5  # held-out random contexts it predicts (Bills et al.: 5 + 5)
    detect: int = 10  # activating and as many non-activating contexts judged for detection
    fuzz: int = 5  # activating contexts judged twice each (true and fuzzed marks) for fuzzing
    context_tokens: int = 32  # tokens of each context shown, around its peak (Paulo et al. use 32)
    scores: tuple[str, ...] = ("simulation", "detection", "fuzzing")
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.scores) - {"simulation", "detection", "fuzzing"}
        if unknown:
            raise ValueError(f"scores: expected some of simulation, detection, fuzzing; got {sorted(unknown)}")
        for name in ("explain_top", "context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class FeatureExamples:
    """What autointerp reads about one feature."""
    top: list[Example]  # top-activating contexts, largest first
    samples: list[Example] = field(default_factory=list)  # activating contexts stratified over quantiles
    random: list[Example] = field(default_factory=list)  # random contexts (mostly not activating)
    random_any: list[Example] = field(default_factory=list)  # random contexts, unfiltered (top-and-random scoring)


def _key(ex: Example) -> tuple:
    return (ex.window, ex.start, tuple(ex.token_ids))


def split(feature: FeatureExamples, cfg: AutointerpConfig) -> dict[str, list[Example]]:
    """Contexts for each role, all cut to cfg.context_tokens: the explainer's (top + a few random), and the
    held-out activating ones (quantile samples not shown to the explainer) and random ones (not shown)."""
    cut = lambda xs: [focus(x, cfg.context_tokens) for x in xs]
    shown_top = feature.top[:cfg.explain_top]
    shown_random = feature.random[len(feature.random) - cfg.explain_random:] if cfg.explain_random else []
    seen = {_key(x) for x in (*shown_top, *shown_random)}
    active = [x for x in feature.samples if x.max_activation > 0 and _key(x) not in seen]
    if not active:  # no quantile samples: fall back to the top contexts the explainer did not see
        active = [x for x in feature.top[cfg.explain_top:] if x.max_activation > 0]
    held_random = [x for x in feature.random if _key(x) not in seen]
    held_top = [x for x in feature.top[cfg.explain_top:] if x.max_activation > 0 and _key(x) not in seen]
    random_any = [x for x in feature.random_any if _key(x) not in seen]
    return {"explain_top": cut(shown_top), "explain_random": cut(shown_random), "active": cut(active),
            "random": cut(held_random), "held_top": cut(held_top), "random_any": cut(random_any)}


def top_and_random(simulate_values: Callable[[list[list[str]]], list[list[float]]], parts: dict,
                   cfg: AutointerpConfig) -> dict:
    """The seed's top-and-random simulation score (Bills et al. 2023): the correlation of simulated with true
    activations over held-out top-activating contexts (top contexts the explainer did not see) and unfiltered
    random contexts together. simulate_values(token lists) -> predicted values per token (the simulator)."""
    held = parts["held_top"][:cfg.simulate_active] + parts["random_any"][:cfg.simulate_random]
    if not parts["held_top"] or not parts["random_any"]:
        return {"score": None, "note": "needs held-out top contexts and unfiltered random ones",
                "contexts": len(held)}
    true = [[max(0.0, float(v)) for v in x.activations] for x in held]
    score = simulation_score(true, simulate_values([x.tokens for x in held]))
    return {"score": score["correlation"], "contexts": len(held), "tokens": score["tokens"],
            **({"note": score["note"]} if "note" in score else {})}


def interpret_feature(backend: Backend, feature: FeatureExamples, cfg: AutointerpConfig | None = None) -> dict:
    """Explanation and scores of one feature, with the hashes of every prompt asked."""
    cfg = cfg or AutointerpConfig()
    if not feature.top or feature.top[0].max_activation <= 0:
        return {"explanation": None, "note": "the feature never fires on its contexts"}
    parts = split(feature, cfg)
    max_activation = max(x.max_activation for x in feature.top)
    exp = explain(backend, parts["explain_top"], parts["explain_random"], context_tokens=cfg.context_tokens)
    out: dict = {"explanation": exp.text, "explanation_raw": exp.raw, "max_activation": max_activation,
                 "prompts": {"explain": exp.prompt_hash}}
    if exp.copied:
        out["explanation_copied"] = True  # scored all the same, and counted in the summary
    if "simulation" in cfg.scores:
        held = parts["active"][:cfg.simulate_active] + parts["random"][:cfg.simulate_random]
        sim = simulate(backend, exp.text, [x.tokens for x in held])
        true = [[max(0.0, float(v)) for v in x.activations] for x in held]  # the activations themselves
        both = simulation_score(true, sim.values)
        n_active = min(cfg.simulate_active, len(parts["active"]))
        top_only = simulation_score(true[:n_active], sim.values[:n_active])
        out["simulation"] = {"protocol": "stratified (quantile samples + non-activating random)",
                             "score": both["correlation"], "score_active_only": top_only["correlation"],
                             "method": sim.method, "contexts": len(held), "tokens": both["tokens"],
                             "unparsed_tokens": sim.unparsed, **({"note": both["note"]} if "note" in both else {})}
        out["prompts"]["simulate"] = sim.prompt_hashes
        if feature.random_any:
            out["simulation"]["top_and_random"] = top_and_random(
                lambda tokens: simulate(backend, exp.text, tokens).values, parts, cfg)
    if "detection" in cfg.scores:
        task = detection(backend, exp.text, parts["active"], parts["random"], cfg.detect)
        out["detection"] = task.scores()
        out["prompts"]["detect"] = task.prompt_hashes
    if "fuzzing" in cfg.scores:
        task = fuzzing(backend, exp.text, parts["active"], max_activation, cfg.fuzz, seed=cfg.seed)
        out["fuzzing"] = task.scores()
        out["prompts"]["fuzz"] = task.prompt_hashes
    return out


def interpret_many(backend: Backend, features: dict[str, FeatureExamples], cfg: AutointerpConfig | None = None, *,
                   progress: bool = True, describe: Callable[[], str] | None = None) -> dict[str, dict]:
    """interpret_feature over features ({name: examples}), backend.parallelism at a time; returns
    {name: result} in the order given. describe() gives the progress bar's postfix (tokens and cost)."""
    cfg = cfg or AutointerpConfig()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(features), desc="autointerp", unit="feature", dynamic_ncols=True)
    results: dict[str, dict] = {}

    def one(name: str) -> tuple[str, dict]:
        return name, interpret_feature(backend, features[name], cfg)

    with ThreadPoolExecutor(max_workers=max(1, backend.parallelism)) as pool:
        for name, result in pool.map(one, features):
            results[name] = result
            if bar is not None:
                if describe is not None:
                    bar.set_postfix_str(describe(), refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    return results


def feature_to_dict(feature: FeatureExamples) -> dict:
    return {k: [asdict(x) for x in getattr(feature, k)] for k in ("top", "samples", "random", "random_any")}


def feature_from_dict(d: dict, where: str = "examples") -> FeatureExamples:
    try:
        return FeatureExamples(**{k: [Example(**x) for x in d.get(k, [])]
                                  for k in ("top", "samples", "random", "random_any")})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected {{'top': [Example fields], 'samples': [...], 'random': [...]}}: {err}") \
            from None
