"""The simulator (Bills et al. 2023): given only an explanation, predict the feature's activation on every
token of held-out contexts. Three ways to read the prediction, best first; the one used is recorded:

- "all_at_once_logprobs": one pass over a prompt with a placeholder after every token; the predicted
  activation is the expected value of the model's next-token distribution over "0".."10" at each
  placeholder, renormalised over those candidates (Bills et al.'s "all at once" method). Candidates the
  tokenizer splits are left out: Gemma writes "10" as "1" "0", so its scale tops out at 9, which a
  correlation does not mind. A server gives only its top few log-probabilities per token (OpenAIBackend
  asks for 5 with `echo_logprobs`; vLLM allows up to 20): the digits among them are the candidates.
- "generated_logprobs": the model writes `token<TAB>activation` lines; each number's value is the
  expected value over the digits in that token's top log-probabilities.
- "generated_numbers": the same lines, with the written numbers as they stand (servers without
  log-probabilities). Lines that cannot be read count as 0 and are counted in `unparsed`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .explain import prompt_hash
from .llm_backends import Backend, Generated, match_candidates
from .llm_prompts import SCALE, simulate_generate_prompt, simulate_slot_prompt

CANDIDATES = [str(i) for i in range(SCALE + 1)]
_NUMBER = re.compile(r"(\d+)\s*$")


@dataclass
class Simulation:
    values: list[list[float]]  # predicted activation (0..10) per token, per context
    methods: list[str]  # per context: how its values were read
    unparsed: int = 0  # tokens whose prediction could not be read (counted as 0)
    prompt_hashes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return "+".join(sorted(set(self.methods)))


def expected_value(logprobs: dict[str, float]) -> float | None:
    """Σ p(v)·v over the candidates "0".."10" present, p renormalised over them; None when none is."""
    items = [(int(c), lp) for c, lp in logprobs.items() if c in CANDIDATES and math.isfinite(lp)]
    if not items:
        return None
    top = max(lp for _, lp in items)
    weights = [(v, math.exp(lp - top)) for v, lp in items]
    total = sum(w for _, w in weights)
    return sum(v * w for v, w in weights) / total


def _token_at(tokens: list[Generated], offset: int) -> Generated | None:
    for g in tokens:
        if g.offset <= offset < g.offset + max(1, len(g.text)):
            return g
    return None


def parse_simulation(text: str, n_tokens: int, tokens: list[Generated] | None = None) -> tuple[list[float], int,
                                                                                                bool]:
    """Values for n_tokens from generated `token<TAB>activation` lines (in order; the i-th line is the i-th
    token), reading each number's log-probabilities when given. Returns (values, unparsed, used logprobs)."""
    values: list[float] = []
    used_logprobs = False
    offset = 0
    for line in text.split("\n"):
        start, offset = offset, offset + len(line) + 1
        if line.strip() in ("<end>", "<start>"):
            if line.strip() == "<end>":
                break
            continue
        if len(values) == n_tokens:
            break
        m = _NUMBER.search(line)
        if m is None:
            values.append(math.nan)
            continue
        value = float(min(SCALE, int(m.group(1))))
        g = _token_at(tokens, start + m.start(1)) if tokens else None
        ev = expected_value(match_candidates(g.top, CANDIDATES)) if g is not None else None
        if ev is not None:
            value, used_logprobs = ev, True
        values.append(value)
    values += [math.nan] * (n_tokens - len(values))
    unparsed = sum(math.isnan(v) for v in values)
    return [0.0 if math.isnan(v) else v for v in values], unparsed, used_logprobs


def simulate(backend: Backend, explanation: str, contexts: list[list[str]], *, top_logprobs: int = 5) -> Simulation:
    """Predicted activations (0..10) of the feature described by explanation on each context (its tokens)."""
    sim = Simulation([], [])
    for tokens in contexts:
        prompt, slots = simulate_slot_prompt(explanation, tokens)
        reply = backend.slot_logprobs(prompt.text(), slots, CANDIDATES) if tokens else None
        if reply is not None:
            evs = [expected_value(lp) for lp in reply.logprobs]
            sim.unparsed += sum(v is None for v in evs)
            sim.values.append([0.0 if v is None else v for v in evs])
            sim.methods.append("all_at_once_logprobs")
        else:
            prompt = simulate_generate_prompt(explanation, tokens)
            out = backend.generate(prompt, 8 * len(tokens) + 16, top_logprobs=top_logprobs, stop=("<end>",))
            values, unparsed, used = parse_simulation(out.text, len(tokens), out.tokens)
            sim.values.append(values)
            sim.unparsed += unparsed
            sim.methods.append("generated_logprobs" if used else "generated_numbers")
        sim.prompt_hashes.append(prompt_hash(prompt.text()))
    return sim
