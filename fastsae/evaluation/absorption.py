"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"; SAEBench's
`absorption` eval, Karvonen et al. 2025): where the latents that track "starts with L" stay silent on a word
that starts with L, and another latent, aligned with the letter's probe, carries the letter instead.

How it follows SAEBench (sae_bench/evals/absorption: vocab.py, prompting.py, k_sparse_probing.py,
feature_absorption_calculator.py, main.py):
- the task: every vocabulary token that is a word of ASCII letters, after dropping a leading space
  (`get_alpha_tokens`), labelled by its first letter; shuffled and split 80 / 20 into train and test words;
- the prompt: up to ten in-context examples from the same split, "{word} has the first letter: W" joined by
  newlines, then "{word} has the first letter:"; the activation is the site's at the word's token (SAEBench's
  position -6);
- a ground-truth probe per letter: a class-balanced one-vs-rest logistic regression on the activations (the
  train words); letters whose probe scores F1 < 0.6 on the test words are left out (`min_GT_probe_f1`);
- the letter's main latents: k-sparse probes on the SAE's latents for k = 1..10, each a class-balanced
  logistic regression on the k latents chosen on the train words; k grows while the test F1 rises by more
  than 0.03 (`add_feature_splits_to_metrics_df`), and the last k's latents are the main ones
  (`num_split_features` = their number - 1 in SAEBench, their number here);
- per test word the probe gets right (logit > 0), with p the unit probe direction, a the SAE's latents,
  c_i = cos(W_dec[i], p), P = x·p and the projection of latent i a_i c_i:
  - absorption fraction: 0 if the main latents' projection M ≥ P or the three largest positive projections
    of other latents with c_i ≥ 0.1 sum to less than 0.4 P; else 1 if M ≤ 0; else A / (A + M) with
    A = min(that sum, P - M), clipped to [0, 1];
  - full absorption: every main latent silent (< 1e-8), the latent of largest projection has c ≥ 0.025,
    P ≥ 0, and that latent's projection is at least 0.4 P;
- per letter, the sums over its true-positive words divided by their number; the scores are the means over
  letters: `mean_absorption_fraction` and `mean_full_absorption` (SAEBench's `mean_absorption_fraction_score`
  and `mean_full_absorption_score`), and `mean_num_split_features`.

Where it departs:
- the k-sparse probes choose their latents by the largest positive difference of mean activation between the
  letter's train words and the others (the selection of SAEBench's sparse-probing eval), not by the weights
  of an L1-penalised probe trained on all latents with Adam: deterministic, and no d_sae-wide training;
- the probes are L-BFGS minimisers of scikit-learn's L2 objective (C = 1, fastsae.evaluation.logistic_probe),
  where SAEBench's ground-truth probe is trained by Adam for 50 epochs with weight decay 1e-4;
- the prompts are built from token ids (the word is its own vocabulary token), so a tokenizer cannot merge the
  word with its neighbours, and prompts of different lengths are batched by length, without padding;
- at most `max_words` words (a seeded sample of the vocabulary: Gemma 3 has about 200k alphabetic tokens,
  SAEBench runs them all), and letters with fewer than MIN_WORDS words are left out and listed (a tiny test
  vocabulary has few).
"""

from __future__ import annotations

import string

import torch
from torch import Tensor

from . import logistic_probe as lp
from .sparse_probing import dense_codes

TEMPLATE = " has the first letter:"  # after the word's own token: SAEBench's "{word} has the first letter:"
ICL_EXAMPLES = 10
TEST_FRACTION = 0.2
MIN_WORDS = 10  # per letter, so that train and test both hold some
MIN_PROBE_F1 = 0.6
MAX_K = 10
F1_JUMP = 0.03
FULL_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
EPS = 1e-8


def first_letter_vocab(tokenizer) -> dict[int, str]:
    """{token id: its first letter, lowercase} for every non-special token that is ASCII letters only once a
    leading space (or SentencePiece's ▁, or GPT-2's Ġ) is dropped."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    out = {}
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if tok is None:
            continue
        word = tok[1:] if tok[:1] in (" ", "\u2581", "\u0120") else tok
        if word and all(ch in string.ascii_letters for ch in word):
            out[i] = word[0].lower()
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompts(tokenizer, words: list[int], pool: list[int], letters: dict[int, str], gen: torch.Generator
            ) -> list[tuple[list[int], int]]:
    """(ids, position of the word) of each word's prompt, its in-context examples drawn from pool."""
    bos = getattr(tokenizer, "bos_token_id", None)
    suffix, newline = _encode(tokenizer, TEMPLATE), _encode(tokenizer, "\n")
    answers = {c: _encode(tokenizer, " " + c.upper()) for c in set(letters.values())}
    out = []
    for word in words:
        others = [w for w in pool if w != word]
        chosen = [others[j] for j in torch.randperm(len(others), generator=gen)[:ICL_EXAMPLES].tolist()]
        ids = [bos] if bos is not None else []
        for ex in chosen:
            ids += [ex] + suffix + answers[letters[ex]] + newline
        out.append((ids + [word] + suffix, len(ids)))
    return out


@torch.no_grad()
def prompt_activations(lm, site: str, batch: list[tuple[list[int], int]], batch_size: int, device: str) -> Tensor:
    """(N, d) float32 activations at site at each prompt's word; prompts of one length are batched together."""
    from ..model import capture

    out: list[Tensor | None] = [None] * len(batch)
    by_length: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(batch):
        by_length.setdefault(len(ids), []).append(i)
    for members in by_length.values():
        for s in range(0, len(members), batch_size):
            chunk = members[s:s + batch_size]
            ids = torch.tensor([batch[i][0] for i in chunk], device=device)
            x = capture(lm, [site], input_ids=ids)[site]  # (B, T, d)
            for row, i in enumerate(chunk):
                out[i] = x[row, batch[i][1]].float().cpu()
    return torch.stack(out)


def letter_probes(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_letters: int
                  ) -> list[tuple[Tensor, float, float]]:
    """(w (d,), b, test F1) of the class-balanced one-vs-rest probe of each letter index."""
    out = []
    for c in range(n_letters):
        w, b = lp.fit_logistic(x_train, y_train == c, balanced=True)
        out.append((w, b, lp.f1(lp.logits(x_test, w, b) > 0, y_test == c)))
    return out


def main_latents(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor) -> tuple[list[int], list[float]]:
    """The letter's main latents (SAEBench's split features) and the test F1 of the k-sparse probe at each k
    tried: k grows from 1 while F1 rises by more than F1_JUMP. y are this letter's 0/1 labels."""
    order = lp.top_mean_diff(z_train, y_train, min(MAX_K, z_train.shape[1]), absolute=False).tolist()
    best, chosen, f1s = -100.0, [], []
    for k in range(1, len(order) + 1):
        idx = order[:k]
        w, b = lp.fit_logistic(z_train[:, idx], y_train, balanced=True)
        f1s.append(lp.f1(lp.logits(z_test[:, idx], w, b) > 0, y_test))
        if f1s[-1] <= best + F1_JUMP:
            break
        best, chosen = f1s[-1], idx
    return chosen, f1s


def word_absorption(x: Tensor, z: Tensor, probe_dir: Tensor, cos: Tensor, main: list[int]) -> tuple[Tensor, Tensor]:
    """(absorption fraction (M,), full absorption (M,) bool) of words with activations x (M, d) and latents
    z (M, d_sae), for the unit probe direction (d,), cos (d_sae,) of each decoder row with it, and the main
    latents (SAEBench's FeatureAbsorptionCalculator, module docstring)."""
    x, z, p, cos = x.double(), z.double(), probe_dir.double(), cos.double()
    act_proj = x @ p  # (M,) P
    proj = z * cos  # (M, d_sae)
    is_main = torch.zeros(z.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(1)  # (M,) M
    candidate = (~is_main & (cos >= FRACTION_COS))[None] & (proj > 0)
    absorbers = torch.where(candidate, proj, 0).topk(min(MAX_ABSORBERS, z.shape[1]), dim=1).values.sum(1)
    share = absorbers / act_proj
    absorbed = torch.minimum(absorbers, act_proj - main_proj)
    partial = (absorbed / (absorbed + main_proj)).nan_to_num(0.0).clamp(0.0, 1.0)
    fraction = torch.where((main_proj >= act_proj) | (share < PROJECTION_SHARE), 0.0,
                           torch.where(main_proj <= 0, 1.0, partial))
    top_proj, top = proj.max(dim=1)
    silent = (z[:, is_main] < EPS).all(1)
    full = silent & (cos[top] >= FULL_COS) & (act_proj >= 0) & (top_proj / act_proj >= PROJECTION_SHARE)
    return fraction, full


def absorption_scores(sae, probes: list[tuple[Tensor, float, float]], x_train: Tensor, y_train: Tensor,
                      x_test: Tensor, y_test: Tensor, letters: list[str], words_test: list[str] | None = None
                      ) -> dict:
    """Absorption of sae on the first-letter task from activations (N, d) and letter indices (N,) of the train
    and test words, with probes from letter_probes. Returns the scores (module docstring), "per_letter" and
    "skipped_letters" {letter: why}."""
    z_train, z_test = dense_codes(sae, x_train).cpu(), dense_codes(sae, x_test).cpu()
    W = sae.W_dec.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (d_sae, d)
    per_letter, skipped = {}, {}
    for c, letter in enumerate(letters):
        w, b, probe_f1 = probes[c]
        if probe_f1 < MIN_PROBE_F1:
            skipped[letter] = f"probe F1 {probe_f1:.3f} < {MIN_PROBE_F1}"
            continue
        main, f1s = main_latents(z_train, y_train == c, z_test, y_test == c)
        tp = ((y_test == c) & (lp.logits(x_test, w, b) > 0)).nonzero().squeeze(1)
        if tp.numel() == 0:
            skipped[letter] = "the probe gets no test word right"
            continue
        p = w / w.norm()
        fraction, full = word_absorption(x_test[tp], z_test[tp], p, W.double() @ p, main)
        per_letter[letter] = {"absorption_fraction": float(fraction.mean()), "full_absorption": float(
            full.double().mean()), "probe_true_positives": tp.numel(), "main_latents": main,
            "num_split_features": len(main), "probe_f1": probe_f1, "k_sparse_f1": f1s}
        if words_test is not None:
            per_letter[letter]["fully_absorbed_words"] = [words_test[i] for i in tp[full].tolist()[:10]]
    out = {"letters": len(per_letter), "skipped_letters": skipped, "per_letter": per_letter}
    for key, name in (("absorption_fraction", "mean_absorption_fraction"), ("full_absorption", "mean_full_absorption"),
                      ("num_split_features", "mean_num_split_features")):
        values = [r[key] for r in per_letter.values()]
        out[name] = sum(values) / len(values) if values else float("nan")
    return out


def run_absorption(lm, tokenizer, site: str, saes: dict, *, max_words: int = 4096, batch_size: int = 16,
                   device: str = "cpu", seed: int = 0) -> dict:
    """Absorption of every SAE in saes {name: SAE} at site of lm on the first-letter task built from tokenizer's
    vocabulary (module docstring). Returns {"words", "train_words", "test_words", "letters", "skipped_letters",
    "per_sae": {name: absorption_scores(...)}}, or with "skipped" (why) when fewer than two letters qualify."""
    if max_words < 2:
        raise ValueError(f"max_words must be >= 2, got {max_words}")
    vocab = first_letter_vocab(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    ids = sorted(vocab)
    if len(ids) > max_words:
        ids = sorted(ids[j] for j in torch.randperm(len(ids), generator=gen)[:max_words].tolist())
    counts = {c: sum(vocab[i] == c for i in ids) for c in string.ascii_lowercase}
    letters = [c for c in string.ascii_lowercase if counts[c] >= MIN_WORDS]
    skipped = {c: f"{n} words < {MIN_WORDS}" for c, n in counts.items() if n < MIN_WORDS}
    out: dict = {"words": sum(counts[c] for c in letters), "letters": letters, "skipped_letters": skipped}
    if len(letters) < 2:
        out["skipped"] = f"{len(letters)} letters have {MIN_WORDS} or more words in the vocabulary; need 2"
        return out
    words = [i for i in ids if vocab[i] in letters]
    words = [words[j] for j in torch.randperm(len(words), generator=gen).tolist()]
    n_train = int(len(words) * (1 - TEST_FRACTION))
    train, test = words[:n_train], words[n_train:]
    index = {c: i for i, c in enumerate(letters)}
    y_train, y_test = (torch.tensor([index[vocab[i]] for i in part]) for part in (train, test))
    x_train = prompt_activations(lm, site, prompts(tokenizer, train, train, vocab, gen), batch_size, device)
    x_test = prompt_activations(lm, site, prompts(tokenizer, test, test, vocab, gen), batch_size, device)
    probes = letter_probes(x_train, y_train, x_test, y_test, len(letters))
    out.update(train_words=len(train), test_words=len(test), per_sae={})
    names = tokenizer.convert_ids_to_tokens(test)
    for name, sae in saes.items():
        kind = getattr(getattr(sae, "cfg", None), "kind", "sae")
        if kind != "sae":
            out["per_sae"][name] = {"skipped": f"a {kind} reads one site and writes another: no decoder direction "
                                               "at the probe's site"}
            continue
        out["per_sae"][name] = absorption_scores(sae, probes, x_train, y_train, x_test, y_test, letters, names)
    return out
