"""Prompts for the explainer, the simulator and the two judges, and how contexts are shown in them.

A prompt is a system text and a user text. Chat servers get them as two messages; completion-style
models (the local default, Gemma 3 270M, is a base model) get `system + "\n\n" + user`, which ends with
a cue the model completes ("Explanation of feature B:"). Each task has one worked example with a
made-up feature first (a base model needs to see the format; Bills et al. 2023 use the same few-shot
layout), then the real feature.

Activations are shown discretised to integers 0..10, 10 being the feature's largest activation on its
top contexts (Bills et al. 2023). Tokens are shown one per line as `token<TAB>activation` for the
simulator, and contexts as text with the active tokens marked <<like this>> for the explainer and judges
(Paulo et al. 2024).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..features.feature_contexts import Example

SCALE = 10  # activations are shown as integers 0..SCALE
SLOT = "unknown"  # the placeholder after each token's tab in an all-at-once simulation prompt (Bills et al.)


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str

    def text(self) -> str:
        """The prompt as one text, for completion-style models and the completions endpoint."""
        return f"{self.system}\n\n{self.user}"

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


def discretise(activations: list[float], max_activation: float) -> list[int]:
    """Activations as integers 0..10: round(10 * a / max_activation), negatives and the unknown as 0."""
    if max_activation <= 0:
        return [0] * len(activations)
    return [min(SCALE, max(0, round(SCALE * a / max_activation))) for a in activations]


def focus(example: Example, width: int) -> Example:
    """The window of `width` tokens around the example's largest activation, with 3/4 of it before the
    peak (a causal model's activation depends on what came before); the whole example when shorter."""
    n = len(example.tokens)
    if width <= 0 or n <= width:
        return example
    peak = max(range(n), key=lambda i: example.activations[i]) if example.max_activation > 0 else 0
    start = min(max(0, peak - (3 * width) // 4), n - width)
    end = start + width
    return Example(example.token_ids[start:end], example.tokens[start:end], example.activations[start:end],
                   example.window, example.start + start, dict(example.meta))


def show_token(token: str) -> str:
    """A token as it can sit on one line of a prompt: newlines and tabs written as \\n and \\t."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def marked_text(tokens: list[str], marks: list[bool]) -> str:
    """The context as one line of text with the marked tokens written <<like this>>."""
    return "".join(f"<<{show_token(t)}>>" if m else show_token(t) for t, m in zip(tokens, marks, strict=True))


# --- explanation -------------------------------------------------------------------------------------------

EXPLAIN_SYSTEM = (
    "We are studying features of a language model's internal activations. Each feature looks for some "
    "particular thing in a short text. Look at the parts of the texts where the feature is active and say, "
    "in one short phrase, what the feature is looking for. Active tokens are marked <<like this>>; their "
    f"activations, from 0 (off) to {SCALE} (strongest), are listed after each text. Do not list examples "
    "of words; name the pattern.")

CUE = "the main thing this feature does is find"  # Bills et al.'s cue: the model goes on in words, not lists
WORKED = ("words for bodies of water", "punctuation that ends a clause or a sentence")  # the examples' answers

_EXPLAIN_EXAMPLE = (
    "Feature A\n"
    "Text 1: The boat drifted down the <<river>> towards the open <<sea>>.\n"
    "Activations: river 7, sea 10\n"
    "Text 2: They swam in the cold <<lake>> every morning.\n"
    "Activations: lake 9\n"
    "Text 3: He opened the letter and read it twice.\n"
    "Activations: none\n"
    f"Explanation of feature A: {CUE} {WORKED[0]}\n\n"
    "Feature C\n"
    "Text 1: She said she would come<<,>> but she never did<<.>>\n"
    "Activations: , 4, . 10\n"
    "Text 2: The rain stopped<<.>> Then the sun came out<<.>>\n"
    "Activations: . 9, . 8\n"
    f"Explanation of feature C: {CUE} {WORKED[1]}\n\n")


def _activation_list(tokens: list[str], levels: list[int]) -> str:
    shown = [f"{show_token(t).strip() or repr(t)} {v}" for t, v in zip(tokens, levels, strict=True) if v > 0]
    return ", ".join(shown) if shown else "none"


def explain_prompt(examples: list[Example], max_activation: float) -> Prompt:
    """The explainer's prompt for a feature shown through `examples` (top-activating and a few random)."""
    parts = ["Feature B\n"]
    for i, ex in enumerate(examples, 1):
        levels = discretise(ex.activations, max_activation)
        parts.append(f"Text {i}: {marked_text(ex.tokens, [v > 0 for v in levels])}\n")
        parts.append(f"Activations: {_activation_list(ex.tokens, levels)}\n")
    parts.append(f"Explanation of feature B: {CUE}")
    return Prompt(EXPLAIN_SYSTEM, _EXPLAIN_EXAMPLE + "".join(parts))


def clean_explanation(text: str) -> str:
    """The first line of the explainer's reply (a written "\\n", as in the contexts, ends it too), without
    quotes or a trailing full stop."""
    line = text.strip().replace("\\n", "\n").splitlines()[0].strip() if text.strip() else ""
    return line.strip("\"'` .").strip()


def copies_an_example(explanation: str) -> bool:
    """True when the explanation is a worked example's answer: a weak explainer copying the prompt."""
    return explanation.strip().lower() in WORKED


# --- simulation --------------------------------------------------------------------------------------------

SIMULATE_SYSTEM = (
    "We are studying features of a language model's internal activations. Each feature looks for some "
    "particular thing in a short text. Given an explanation of what a feature looks for, predict its "
    f"activation on every token of a text, from 0 (off) to {SCALE} (strongest). Most tokens are 0. Write "
    "one line per token, `token<TAB>activation`, between <start> and <end>.")

_SIMULATE_EXAMPLE = (
    "Feature A\n"
    f"Explanation of feature A: {CUE} {WORKED[0]}\n"
    "Activations:\n<start>\nThe\t0\n boat\t0\n drifted\t0\n down\t0\n the\t0\n river\t7\n towards\t0\n"
    " the\t0\n open\t0\n sea\t10\n.\t0\n<end>\n\n")


def simulate_slot_prompt(explanation: str, tokens: list[str]) -> tuple[Prompt, list[int]]:
    """The all-at-once prompt (Bills et al. 2023): every token followed by a tab and a placeholder. The
    model's next-token distribution at each placeholder, over "0".."10", gives that token's predicted
    activation in one forward pass. Returns the prompt and the placeholders' offsets in prompt.text()."""
    head = (f"{_SIMULATE_EXAMPLE}Feature B\nExplanation of feature B: {CUE} {explanation}\n"
            "Activations:\n<start>\n")
    base = len(SIMULATE_SYSTEM) + 2  # text() puts the system text and "\n\n" first
    body, slots = [head], []
    offset = len(head)
    for t in tokens:
        line = f"{show_token(t)}\t"
        slots.append(base + offset + len(line))
        body.append(f"{line}{SLOT}\n")
        offset += len(line) + len(SLOT) + 1
    body.append("<end>\n")
    return Prompt(SIMULATE_SYSTEM, "".join(body)), slots


def simulate_generate_prompt(explanation: str, tokens: list[str]) -> Prompt:
    """The simulator's prompt for backends without prompt log-probabilities: it lists the tokens and the
    model writes the `token<TAB>activation` lines itself (parsed by parse_simulation)."""
    user = (f"{_SIMULATE_EXAMPLE}Feature B\nExplanation of feature B: {CUE} {explanation}\n"
            f"Tokens: {json.dumps(tokens)}\nActivations:\n<start>\n")
    return Prompt(SIMULATE_SYSTEM, user)


# --- detection and fuzzing ---------------------------------------------------------------------------------

DETECT_SYSTEM = (
    "We are studying features of a language model's internal activations. Each feature looks for some "
    "particular thing in a short text. Given an explanation of a feature and a text, say whether the feature "
    "is active anywhere in the text. Answer yes or no.")

_DETECT_EXAMPLE = (
    "Explanation: words for bodies of water\n"
    "Text: They swam in the cold lake every morning.\n"
    "Is the feature active in this text? Answer: yes\n\n"
    "Explanation: words for bodies of water\n"
    "Text: He opened the letter and read it twice.\n"
    "Is the feature active in this text? Answer: no\n\n")

FUZZ_SYSTEM = (
    "We are studying features of a language model's internal activations. Each feature looks for some "
    "particular thing in a short text. Given an explanation of a feature and a text in which some tokens are "
    "marked <<like this>>, say whether the marked tokens are the ones the explanation describes. Answer yes "
    "or no.")

_FUZZ_EXAMPLE = (
    "Explanation: words for bodies of water\n"
    "Text: The boat drifted down the <<river>> towards the open <<sea>>.\n"
    "Are the marked tokens the ones the feature is active on? Answer: yes\n\n"
    "Explanation: words for bodies of water\n"
    "Text: The <<boat>> drifted down the river towards the <<open>> sea.\n"
    "Are the marked tokens the ones the feature is active on? Answer: no\n\n")


def detect_prompt(explanation: str, tokens: list[str]) -> Prompt:
    text = marked_text(tokens, [False] * len(tokens))
    return Prompt(DETECT_SYSTEM, f"{_DETECT_EXAMPLE}Explanation: {explanation}\nText: {text}\n"
                                 "Is the feature active in this text? Answer:")


def fuzz_prompt(explanation: str, tokens: list[str], marks: list[bool]) -> Prompt:
    return Prompt(FUZZ_SYSTEM, f"{_FUZZ_EXAMPLE}Explanation: {explanation}\nText: {marked_text(tokens, marks)}\n"
                               "Are the marked tokens the ones the feature is active on? Answer:")
