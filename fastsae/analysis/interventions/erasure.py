"""Concept erasure: ablate the latents most associated with a concept, and compare what that costs where the
concept is needed with what it costs everywhere else, against ablating as many PCA directions chosen the
same way.

    target = next_token_mask(windows, pronoun_ids)        # (S, T): positions whose next token is a pronoun
    result = erasure(model, "resid_post.6", sae, windows, target, counts=(1, 4, 16))
    result["rows"]   # per method and count: loss increase on target positions vs on all others

A concept is a (S, T) mask over token windows: positions that predict a token class (next_token_mask; e.g.
gendered pronouns, the built-in example) or every position of labelled prompts. The procedure:
  1. Association, on the first fit_windows windows: each latent's standardised mean difference
     d_i = (mean z_i on target - mean z_i elsewhere) / pooled standard deviation, over real non-BOS
     positions. The n latents of largest |d_i| are chosen (for PCA the sign of a direction is arbitrary, so
     both are ranked by |d|: "the same way"). SAE statistics are summed from the sparse codes.
  2. Ablation on the remaining windows: the chosen latents are zeroed (a PCA coefficient set to that of the
     mean) at every real non-BOS position, the error term kept (fastsae.analysis.interventions.latent_edits), and the
     next-token cross-entropy compared with the clean model's, separately on target positions and on the
     rest. selectivity = Δloss_target / Δloss_other: high when the edit removes the concept and little else;
     None when the other tokens' loss does not rise (Δloss_other <= 0: the edit costs the rest nothing, which
     no ratio expresses; a negative ratio would rank that best case below every positive one).
  3. LEACE (against "leace", default beside PCA; fastsae.analysis.interventions.concept_leace): the
     least-squares linear eraser of the concept, fitted on the same fit-window activations and labels (the
     target mask, or labels= for a concept of more classes), applied at the same site and positions. It is one
     edit, not a ranking, so it has one row whatever the counts: n = its rank r (number of classes - 1 for a
     one-hot concept, 1 for a target mask), its row's "directions".
Every row has "directions": how many directions the edit removes (n).

Two concepts are built in (CONCEPTS): the next token a gendered pronoun, or a first name (the IOI task's names).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import io
from ...evaluation import baselines
from ...model import capture, keep_mask, special_token_ids
from ..decompositions import transcoder_out_site
from .concept_leace import fit_leace
from .ioi import NAMES
from .latent_edits import Intervention, as_dictionary, hook_interventions
from .padded_prompts import widen

# Gendered English pronouns, each with a leading space (a word inside a sentence) and capitalised.
PRONOUNS = ("he", "she", "him", "her", "his", "hers", "himself", "herself")
# The built-in concepts: the words whose next-token positions are the target (token_ids keeps the single tokens).
CONCEPTS = {"gendered_pronouns": PRONOUNS, "names": NAMES}
AGAINST = ("pca", "ica", "neurons", "random", "leace")


def token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Ids of the words that are one token after a space, in lower and capitalised form."""
    ids = set()
    for word in words:
        for form in (word, word.capitalize()):
            encoded = tokenizer.encode(" " + form, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
    if not ids:
        raise ValueError(f"none of {list(words)} is a single token for this tokenizer")
    return sorted(ids)


def next_token_mask(windows: Tensor, ids: Sequence[int]) -> Tensor:
    """(S, T) bool: positions whose next token is one of ids (the last column has no next token)."""
    mask = torch.zeros_like(windows, dtype=torch.bool)
    mask[:, :-1] = torch.isin(windows[:, 1:], torch.as_tensor(list(ids), dtype=windows.dtype))
    return mask


def association(dictionary, codes, target: Tensor, keep: Tensor) -> Tensor:
    """(n_latents,) standardised mean difference of each latent between target and other kept positions.
    codes: SparseLatents or dense (…, n) coefficients over the same positions as target/keep (…)."""
    dictionary = as_dictionary(dictionary)
    n = dictionary.size
    sums = {}
    for name, where in (("target", target & keep), ("other", ~target & keep)):
        count = int(where.sum())
        if count < 2:
            raise ValueError(f"the concept needs at least 2 {name} positions in the fit windows, got {count}")
        if isinstance(codes, Tensor):
            z = codes[where].double()  # (count, n)
            s1, s2 = z.sum(0), z.pow(2).sum(0)
        else:  # sparse: sum values and squares per latent
            values, indices = codes.values[where].double(), codes.indices[where]
            s1 = torch.zeros(n, dtype=torch.float64).index_add_(0, indices.flatten().cpu(), values.flatten().cpu())
            s2 = torch.zeros(n, dtype=torch.float64).index_add_(0, indices.flatten().cpu(),
                                                               values.pow(2).flatten().cpu())
        mean = s1.cpu() / count
        sums[name] = (mean, (s2.cpu() / count - mean.pow(2)).clamp_min(0), count)
    (m1, v1, c1), (m0, v0, c0) = sums["target"], sums["other"]
    pooled = ((c1 * v1 + c0 * v0) / (c1 + c0)).sqrt()
    return (m1 - m0) / pooled.clamp_min(1e-12)


@torch.no_grad()
def _losses(model: nn.Module, windows: Tensor, keep: Tensor, batch_size: int, site: str | None = None,
            iv: Intervention | None = None) -> Tensor:
    """(S, T-1) next-token cross-entropy at every position, with iv at site when given."""
    device = next(model.parameters()).device
    out = []
    for first in range(0, windows.shape[0], batch_size):
        ids = windows[first:first + batch_size].to(device)
        if iv is not None:
            iv.positions = keep[first:first + batch_size].to(device)
            with hook_interventions(model, {site: iv}):
                logits = model(input_ids=ids).logits
        else:
            logits = model(input_ids=ids).logits
        logp = F.log_softmax(widen(logits[:, :-1]), dim=-1)
        out.append(-logp.gather(-1, ids[:, 1:, None])[..., 0].cpu())
    return torch.cat(out)


def erasure(model: nn.Module, site: str, sae, windows: Tensor, target: Tensor, *, counts: Sequence[int] = (1, 4, 16),
            fit_windows: int | None = None, against: Sequence[str] = ("pca", "leace"), batch_size: int = 2,
            excluded: Sequence[int] | None = None, labels: Tensor | None = None) -> dict:
    """Loss increase on target vs other positions after ablating the n most associated latents, n in counts,
    for the SAE and each baseline (fitted on the fit windows' activations), and after LEACE. labels: (S, T)
    integer classes LEACE erases (default the target mask: two classes). See the module docstring."""
    start = time.perf_counter()
    _check(windows, target, labels, against)
    if excluded is None:
        excluded = special_token_ids(model)
    keep = keep_mask(windows, excluded)
    fit_windows = fit_windows if fit_windows is not None else windows.shape[0] // 2
    if not 0 < fit_windows < windows.shape[0]:
        raise ValueError(f"fit_windows must be in (0, {windows.shape[0]}), got {fit_windows}")
    device = next(model.parameters()).device
    # a transcoder reads site and ablates at its out-site: the baselines are fitted and ablated there too
    out_site = transcoder_out_site(sae) if isinstance(sae, nn.Module) else None
    acts, base_acts = _fit_activations(model, site, out_site or site, windows[:fit_windows], batch_size)
    fit_keep, fit_target = keep[:fit_windows], target[:fit_windows]
    fit_labels = (labels if labels is not None else target.long())[:fit_windows]
    dictionaries = {"sae": sae}
    for kind in against:
        d = acts.shape[-1]
        x = base_acts[fit_keep].float()
        dictionaries[kind] = fit_leace(x, fit_labels[fit_keep]) if kind == "leace" else baselines.fit(kind, x, d, d)
    eval_windows, eval_keep = windows[fit_windows:], keep[fit_windows:]
    # the loss at position t is that of predicting token t+1: it counts when t is kept and t+1 is a real token
    counted = eval_keep[:, :-1] & keep_mask(eval_windows[:, 1:], excluded)
    eval_target = target[fit_windows:, :-1] & counted
    eval_other = ~target[fit_windows:, :-1] & counted
    if not eval_target.any():
        raise ValueError("no target position in the evaluation windows: give more windows or a commoner concept")
    clean = _losses(model, eval_windows, eval_keep, batch_size)
    base = (float(clean[eval_target].mean()), float(clean[eval_other].mean()))
    rows = []
    for name, dic in dictionaries.items():
        dic = as_dictionary(dic)
        where = site if name == "sae" else out_site or site
        if name == "leace":  # one edit: zero all r coefficients, i.e. apply the eraser
            chosen, scores, ns = list(range(dic.size)), None, [dic.size]
        else:
            with torch.no_grad():
                codes = dic.codes((acts if name == "sae" else base_acts).to(device))
            scores = association(dic, codes, fit_target.to(device), fit_keep.to(device))
            chosen, ns = scores.abs().argsort(descending=True).tolist(), counts
        for n in ns:
            losses = _losses(model, eval_windows, eval_keep, batch_size, where, Intervention(dic, zero=chosen[:n]))
            rows.append(_row(name, chosen[:n], scores, losses, eval_target, eval_other, base))
    return {"site": site, **({"out_site": out_site} if out_site else {}), "fit_windows": fit_windows,
            "eval_windows": int(eval_windows.shape[0]),
            "target_positions": int(eval_target.sum()), "other_positions": int(eval_other.sum()),
            "clean_loss_target": base[0], "clean_loss_other": base[1], "rows": rows,
            "seconds": time.perf_counter() - start}


def _check(windows: Tensor, target: Tensor, labels: Tensor | None, against: Sequence[str]) -> None:
    if windows.dim() != 2 or target.shape != windows.shape:
        raise ValueError(f"windows (S, T) and target must have the same 2-D shape, got {tuple(windows.shape)} "
                         f"and {tuple(target.shape)}")
    if labels is not None and labels.shape != windows.shape:
        raise ValueError(f"labels must have the windows' shape {tuple(windows.shape)}, got {tuple(labels.shape)}")
    bad = [k for k in against if k not in AGAINST]
    if bad:
        raise ValueError(f"against: each comparator must be one of {AGAINST}, got {bad}")


def _row(name: str, chosen: list[int], scores: Tensor | None, losses: Tensor, eval_target: Tensor,
         eval_other: Tensor, base: tuple[float, float]) -> dict:
    """One report row: the edit's losses on target and other positions against the clean ones (base)."""
    loss_target, loss_other = float(losses[eval_target].mean()), float(losses[eval_other].mean())
    dt, do = loss_target - base[0], loss_other - base[1]
    return {"method": name, "n": len(chosen), "directions": len(chosen), "latents": chosen,
            "association": None if scores is None else [float(scores[i]) for i in chosen],
            "loss_target": loss_target, "loss_other": loss_other, "delta_target": dt, "delta_other": do,
            "selectivity": selectivity(dt, do)}


@torch.no_grad()
def _fit_activations(model: nn.Module, site: str, base_site: str, windows: Tensor,
                     batch_size: int) -> tuple[Tensor, Tensor]:
    """The activations (S, T, d) the dictionary encodes (site) and those the baselines fit (base_site: a
    transcoder's out-site, else the same tensor)."""
    device = next(model.parameters()).device
    parts = [capture(model, [site, base_site], input_ids=windows[i:i + batch_size].to(device))
             for i in range(0, windows.shape[0], batch_size)]
    acts = torch.cat([p[site].cpu() for p in parts])
    return acts, acts if base_site == site else torch.cat([p[base_site].cpu() for p in parts])


def selectivity(delta_target: float, delta_other: float) -> float | None:
    """Δloss_target / Δloss_other when the other tokens' loss rises, else None (see the module docstring)."""
    return delta_target / delta_other if delta_other > 1e-12 else None


def plot(result: dict, path) -> None:
    """Loss increase on target and on other positions against the number of ablated directions, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for method, color in zip(methods, ("C0", "C1", "C2", "C3", "C4", "C5"), strict=False):
        rows = [r for r in result["rows"] if r["method"] == method]
        ns = [r["n"] for r in rows]
        # LEACE is one edit of rank r: a single marker per line
        ax.plot(ns, [r["delta_target"] for r in rows], "o-" if len(rows) > 1 else "*", color=color,
                label=f"{method}: target tokens")
        ax.plot(ns, [r["delta_other"] for r in rows], "o--" if len(rows) > 1 else "x", color=color,
                label=f"{method}: all other tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("directions ablated (most associated with the concept)")
    ax.set_ylabel("loss increase (nats)")
    ax.set_title(f"concept erasure at {result['site']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.write_figure(path, fig)
    plt.close(fig)
