"""The explainer (Bills et al. 2023): shown a feature's top-activating contexts and a few random ones,
with activations discretised to 0..10, the model writes a short explanation of what the feature detects."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..features.feature_contexts import Example
from .llm_backends import Backend
from .llm_prompts import clean_explanation, copies_an_example, explain_prompt, focus

MAX_TOKENS = 48  # an explanation is one short phrase; Bills et al. cap theirs at 60 tokens


@dataclass
class Explanation:
    text: str  # the cleaned explanation ("" when the model gave none)
    raw: str  # the model's reply as it came
    prompt_hash: str  # SHA-256 of the prompt text (first 16 hex digits)
    copied: bool = False  # the explanation is a worked example's (the explainer copied its prompt)


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def explain(backend: Backend, top: list[Example], random: list[Example] = (), *, context_tokens: int = 32,
            max_tokens: int = MAX_TOKENS) -> Explanation:
    """Explain the feature whose top-activating contexts are `top` (largest first); `random` contexts show
    the explainer what the feature does not fire on. Contexts are cut to context_tokens around their peak."""
    if not top:
        raise ValueError("top: the explainer needs at least one top-activating context")
    max_activation = max(ex.max_activation for ex in top)
    shown = [focus(ex, context_tokens) for ex in (*top, *random)]
    prompt = explain_prompt(shown, max_activation)
    reply = backend.generate(prompt, max_tokens, stop=("\n",))
    text = clean_explanation(reply.text)
    return Explanation(text, reply.text, prompt_hash(prompt.text()), copies_an_example(text))
