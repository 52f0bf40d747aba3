"""The one interface every language model for autointerp has, and what its calls return:

    backend.generate(prompt, max_tokens, top_logprobs=0, stop=())  -> Reply (text, per-token alternatives)
    backend.slot_logprobs(text, slots, candidates) -> [{candidate: logprob}] per slot, or None (not offered)

`slot_logprobs` reads the model's next-token distribution at given character offsets of one prompt, in
one pass: what the all-at-once simulator (Bills et al. 2023) and the yes/no judges need. Two backends:

- `local_llm.LocalBackend`: any `transformers` causal LM, offline (default `fastsae.model.load("gemma-3-270m")`,
  a 270M base model: a weak explainer). Greedy decoding; exact log-probabilities.
- `openai_client.OpenAIBackend`: any OpenAI-compatible HTTP server (vLLM, llama.cpp server, TGI, a hosted API)
  through the standard library, hardened against servers that misbehave (see its module).

`autointerp_run.parse_backend` builds either from a `--backend` spec. Nothing here caches;
`request_cache.CachedBackend` wraps any backend with the on-disk cache.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .llm_prompts import Prompt


class BackendError(RuntimeError):
    """A language-model request that failed for a reason retrying does not fix (or retries ran out)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status, when there was one


@dataclass
class Generated:
    """One generated token: its text, where it starts in Reply.text, and its top alternatives."""
    text: str
    offset: int
    top: dict[str, float] = field(default_factory=dict)  # token text -> log-probability


@dataclass
class Reply:
    text: str
    tokens: list[Generated] | None = None  # when top_logprobs were asked for and given
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "tokens": None if self.tokens is None else [[g.text, g.offset, g.top] for g in self.tokens]}

    @classmethod
    def from_dict(cls, d: dict) -> Reply:
        tokens = None if d.get("tokens") is None else [Generated(t, o, top) for t, o, top in d["tokens"]]
        return cls(d["text"], tokens, d.get("prompt_tokens", 0), d.get("completion_tokens", 0))


@dataclass
class SlotReply:
    logprobs: list[dict[str, float]]  # per slot: {candidate: log-probability} for the candidates it could score
    prompt_tokens: int = 0


class Backend(ABC):
    name: str  # "local:gemma-3-270m", "openai:http://127.0.0.1:8000/v1": part of every cache key
    model: str
    parallelism: int = 1  # how many requests the pipeline may have in flight at once

    @abstractmethod
    def generate(self, prompt: Prompt, max_tokens: int, top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> Reply:
        """Greedy continuation of prompt (temperature 0), cut before the first stop string."""

    @abstractmethod
    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply | None:
        """For each character offset in slots, the log-probability of each candidate string being the next
        token after text[:offset] (candidates the model cannot score there are left out). None when the
        backend cannot read prompt log-probabilities."""


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """text up to the first of the stop strings in it (all of it when none is)."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def match_candidates(top: dict[str, float], candidates: list[str]) -> dict[str, float]:
    """Log-probabilities of the candidates among a token -> logprob map; tokens that differ only by
    surrounding whitespace or case (" 3", "3"; " Yes", "yes") are pooled."""
    pooled: dict[str, list[float]] = {}
    wanted = {c.strip().lower(): c for c in candidates}
    for token, lp in top.items():
        c = wanted.get(token.strip().lower())
        if c is not None and lp is not None and math.isfinite(lp):
            pooled.setdefault(c, []).append(lp)
    return {c: logsumexp(v) for c, v in pooled.items()}
