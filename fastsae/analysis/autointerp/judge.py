"""The cheaper scores of Paulo et al. 2024 ("Automatically interpreting millions of features in large
language models"): a judge model, given only the explanation, answers yes or no.

- detection: does this context activate the feature? Activating contexts (held-out quantile samples)
  and as many non-activating ones (random contexts), so a judge that always says yes scores 0.5.
- fuzzing: are the marked tokens the ones the feature fires on? Each activating context twice, once with
  its active tokens marked and once with as many other tokens marked at random: balanced by construction.

The judge's answer is read from its next-token probabilities over yes/no when the backend gives them
(so AUROC can be reported as well), else from the generated text; the way used is recorded.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass, field

from ..features.feature_contexts import Example
from .explain import prompt_hash
from .llm_backends import Backend, match_candidates
from .llm_prompts import Prompt, detect_prompt, discretise, fuzz_prompt
from .scoring import binary_scores

ANSWERS = [" yes", " no", "yes", "no", " Yes", " No", "Yes", "No"]  # pooled by word (match_candidates)


@dataclass
class Judgement:
    yes: bool
    p_yes: float | None  # P(yes) / (P(yes) + P(no)) when log-probabilities were given
    method: str  # "prompt_logprobs", "generated_logprobs" or "generated_text"


@dataclass
class Task:
    """Judgements against known labels, and what they score."""
    labels: list[bool] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)
    prompt_hashes: list[str] = field(default_factory=list)

    def scores(self) -> dict:
        out = binary_scores(self.labels, [j.yes for j in self.judgements], [j.p_yes for j in self.judgements])
        out["method"] = "+".join(sorted({j.method for j in self.judgements}))
        return out


def _p_yes(logprobs: dict[str, float]) -> float | None:
    pooled = match_candidates(logprobs, ["yes", "no"])
    if "yes" not in pooled and "no" not in pooled:
        return None
    yes, no = math.exp(pooled.get("yes", -math.inf)), math.exp(pooled.get("no", -math.inf))
    return yes / (yes + no)


def judge(backend: Backend, prompt: Prompt, *, top_logprobs: int = 10) -> Judgement:
    """Yes or no to prompt (which ends with "Answer:")."""
    text = prompt.text()
    slot = backend.slot_logprobs(text, [len(text)], ANSWERS)
    if slot is not None and (p := _p_yes(slot.logprobs[0])) is not None:
        return Judgement(p > 0.5, p, "prompt_logprobs")
    reply = backend.generate(prompt, 3, top_logprobs=top_logprobs, stop=("\n",))
    if reply.tokens:
        first = next((g for g in reply.tokens if g.text.strip()), reply.tokens[0])
        if (p := _p_yes(first.top)) is not None:
            return Judgement(p > 0.5, p, "generated_logprobs")
    return Judgement(reply.text.strip().lower().startswith("yes"), None, "generated_text")


def detection(backend: Backend, explanation: str, activating: list[Example], non_activating: list[Example],
              n: int) -> Task:
    """n activating and n non-activating contexts (fewer when either list is shorter), judged one by one."""
    n = min(n, len(activating), len(non_activating))
    task = Task()
    for label, examples in ((True, activating[:n]), (False, non_activating[:n])):
        for ex in examples:
            prompt = detect_prompt(explanation, ex.tokens)
            task.labels.append(label)
            task.judgements.append(judge(backend, prompt))
            task.prompt_hashes.append(prompt_hash(prompt.text()))
    return task


def fuzz_marks(ex: Example, max_activation: float, rng: _random.Random) -> tuple[list[bool], list[bool]] | None:
    """(true marks, fuzzed marks) for one context: its active tokens (level >= 1 of 0..10, as the explainer
    saw them), and as many tokens drawn from the inactive ones. None when either set would be empty."""
    active = [v > 0 for v in discretise(ex.activations, max_activation)]
    k = sum(active)
    inactive = [i for i, a in enumerate(active) if not a]
    if k == 0 or len(inactive) < k:
        return None
    chosen = set(rng.sample(inactive, k))
    return active, [i in chosen for i in range(len(active))]


def fuzzing(backend: Backend, explanation: str, activating: list[Example], max_activation: float, n: int,
            seed: int = 0) -> Task:
    """Up to n activating contexts, each judged with its true marks and with fuzzed ones (2n judgements)."""
    rng = _random.Random(seed)
    task = Task()
    for ex in activating:
        if len(task.labels) >= 2 * n:
            break
        marks = fuzz_marks(ex, max_activation, rng)
        if marks is None:
            continue
        for label, m in zip((True, False), marks, strict=True):
            prompt = fuzz_prompt(explanation, ex.tokens, m)
            task.labels.append(label)
            task.judgements.append(judge(backend, prompt))
            task.prompt_hashes.append(prompt_hash(prompt.text()))
    return task
