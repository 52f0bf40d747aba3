"""Evaluate SAEs (and baselines) at a model's site on token windows: reconstruction, sparsity, downstream.

Downstream metrics (causal LMs), next-token cross-entropy averaged over positions whose token is
not excluded (BOS/EOS/pad; the replacement is also applied only there, as in SAELens):

    ce_loss_without_sae           the clean model
    ce_loss_with_sae              the site's activation replaced by x̂
    ce_loss_with_ablation         ... replaced by 0 (zero ablation)
    ce_loss_with_mean_ablation    ... replaced by its mean over the eval tokens
    ce_loss_recovered             (ablation - with_sae) / (ablation - without_sae), zero ablation
                                  (SAELens's ce_loss_score)
    ce_loss_with_sae_and_error    x̂ + (x - x̂): must equal ce_loss_without_sae (a self-check of the splice)
    kl_div_with_sae, kl_div_with_ablation   E KL(p_clean || p_variant) over the next-token distributions
    kl_div_score                  (kl_with_ablation - kl_with_sae) / kl_with_ablation (SAELens)
    perplexity_without_sae, perplexity_with_sae, perplexity_increase = exp(ce_with_sae) - exp(ce_without_sae)

Encoder models (BERT, MiniLM) have no next-token loss; instead, with sentence embeddings the
attention-masked mean of the final hidden states (sentence-transformers' pooling):

    embedding_cossim_with_sae, embedding_cossim_with_ablation, embedding_cossim_with_mean_ablation,
    embedding_cossim_with_sae_and_error    E cos(e_clean, e_variant) over sequences

Transcoders (SAEConfig.kind "transcoder" / "skip_transcoder") read site and predict their out-site (e.g.
mlp_in.6 -> mlp_out.6; from sae.metadata["out_site"] or evaluate's out_sites=): the reconstruction metrics
compare the out-site's y with ŷ = decode(encode(x)) [+ skip(x)], "with_sae" replaces the out-site by ŷ
(fastsae.model.splice_transcoder), and the ablations are of the out-site, so ce_loss_recovered is against
zeroing the MLP's output. They run the straightforward path (one whole forward per variant,
fastsae.evaluation.whole_forward), once per out-site; each transcoder's results also hold its out-site's
ablation numbers (ce_loss_with_ablation, ...) and "site" / "out_site". "model" holds the SAEs' site's, or
with transcoders only, the first out-site's.

Crosscoders (SAEConfig.kind "crosscoder") replace all their sites at once, each by its reconstruction from the
clean activations of every site; the ablations are of all their sites, and the results add per-site FVU
(fastsae/evaluation/crosscoder_eval.py).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..model import Splice
from ..model.upper import Lower, lm_head_logits, run_from_site, run_to_site, supports_site_runs
from .metrics import ReconstructionMetrics
from .variant_records import (
    MetricSums,
    evaluation_results,
    is_causal_lm,
    reconstruction_records,
    record_splice,
    scored_positions,
)
from .whole_forward import evaluate_reference

# Sequences per batched upper run (variants × batch): 9 variants of 4 windows of Gemma 3 270M's 128 tokens
# run in one; a sweep of many SAEs is split into several runs so activations stay small on a GPU.
PASS_SEQUENCES = 64
# Rows of logits (variants × positions) the head computes at once: 256 × Gemma's 262,144 vocabulary is
# 268 MB of fp32, and GEMMs of 256 rows run near the 2-core CPU's best (M=64: 47 GFLOP/s, M=512: 67).
HEAD_ROWS = 256


def _variants(decompositions: dict, mean: Tensor, no_error_check: tuple[str, ...], causal: bool
              ) -> list[tuple[str, str | None, Splice | None]]:
    """(loss key, KL key or None, splice or None for the clean model) of every forward the metrics need:
    the clean model first, then those with a KL term (contiguous, so the head takes them as one slice)."""
    if causal:
        out = [("ce_loss_without_sae", None, None),
               ("ce_loss_with_ablation", "kl_div_with_ablation", Splice(None, "zero", False, False)),
               ("ce_loss_with_mean_ablation", "kl_div_with_mean_ablation", Splice(None, mean, False, False))]
        out += [(f"{name}/ce_loss_with_sae", f"{name}/kl_div_with_sae", Splice(dec, None, False, True))
                for name, dec in decompositions.items()]
        out += [(f"{name}/ce_loss_with_sae_and_error", None, Splice(dec, None, True, False))
                for name, dec in decompositions.items() if name not in no_error_check]
        return out
    out = [("", None, None), ("embedding_cossim_with_ablation", None, Splice(None, "zero", False, False)),
           ("embedding_cossim_with_mean_ablation", None, Splice(None, mean, False, False))]
    for name, dec in decompositions.items():
        out.append((f"{name}/embedding_cossim_with_sae", None, Splice(dec, None, False, True)))
        if name not in no_error_check:
            out.append((f"{name}/embedding_cossim_with_sae_and_error", None, Splice(dec, None, True, False)))
    return out


@torch.no_grad()
def _head_sums(model: nn.Module, hidden: Tensor, ids: Tensor, mask: Tensor, variants: list, head_rows: int,
               add) -> None:
    """Next-token CE of every variant and KL(clean || variant) where asked, from final hidden states
    (n, B, T, d) at the positions of mask (B, T-1), a chunk of positions at a time: the (n, P, vocab)
    log-probabilities never exist at once, and the clean ones (variant 0) serve every KL of their chunk."""
    h = hidden[:, :, :-1][:, mask]  # (n, P, d)
    targets = ids[:, 1:][mask]  # (P,)
    n, positions = h.shape[0], h.shape[1]
    step = max(1, head_rows // n)
    n_kl = sum(v[1] is not None for v in variants)
    if [v[1] is not None for v in variants] != [False] + [True] * n_kl + [False] * (n - 1 - n_kl):
        raise ValueError("variants must be the clean model, then those with a KL term, then the others")
    for first in range(0, positions, step):
        logp = F.log_softmax(lm_head_logits(model, h[:, first:first + step]).float(), dim=-1)  # (n, c, V)
        target = targets[first:first + step]
        ce = -logp.gather(-1, target.expand(n, -1)[..., None])[..., 0]  # (n, c)
        for i, (ce_key, _, _) in enumerate(variants):
            add(ce_key, ce[i])
        if n_kl:
            clean = logp[0]
            # KL(p_clean || p) = Σ p_clean (log p_clean - log p): fastsae.losses.kl_div's terms, negated twice
            # (exact in floating point) so that it runs in place on the variants' log-probabilities
            kl = logp[1:1 + n_kl].sub_(clean).mul_(clean.exp()).sum(-1).neg_()  # (n_kl, c)
            for row in range(n_kl):
                add(variants[1 + row][1], kl[row])
        del logp


@torch.no_grad()
def evaluate(model: nn.Module, site: str, windows: Tensor, decompositions: dict, *, batch_size: int = 8,
             exclude_token_ids: list[int] | None = None, no_error_check: tuple[str, ...] = (),
             progress: bool = True, head_rows: int = HEAD_ROWS, reference: bool = False,
             out_sites: dict[str, str] | None = None) -> dict[str, dict]:
    """Metrics for every decomposition (name -> SAE or baseline) on windows (S, T) at site. Returns
    {name: metrics} plus the shared numbers under "model".
    no_error_check: names whose error-term forward (the splice self-check) is skipped, to save time.

    The blocks below the site run once per batch (fastsae.model.run_to_site, which also gives the
    mean for mean ablation); every variant (clean, ablations, each decomposition with and without its
    error term) runs only the blocks from the site up, all in one batched run, and the LM head is
    applied a chunk of scored positions at a time. The same numbers as the straightforward evaluation
    (fastsae.evaluation.whole_forward, one whole forward per variant) to float tolerance
    (tests/evaluation/test_eval_fast.py). reference=True takes that straightforward path (benchmarks); so
    does a family fastsae.model.upper does not know. out_sites: name -> a transcoder's output site, where its
    metadata does not record it (module docstring)."""
    if any(_kind(d) == "crosscoder" for d in decompositions.values()):  # all its sites spliced at once
        from .crosscoder_eval import evaluate_with_crosscoders

        return evaluate_with_crosscoders(evaluate, model, site, windows, decompositions, batch_size=batch_size,
                                         exclude_token_ids=exclude_token_ids, no_error_check=no_error_check,
                                         progress=progress, head_rows=head_rows, reference=reference,
                                         out_sites=out_sites)
    if any(_kind(d) != "sae" for d in decompositions.values()):
        return _evaluate_with_transcoders(model, site, windows, decompositions, out_sites or {}, batch_size=batch_size,
                                          exclude_token_ids=exclude_token_ids, no_error_check=no_error_check,
                                          progress=progress, head_rows=head_rows, reference=reference)
    if reference or not supports_site_runs(model):
        return evaluate_reference(model, site, windows, decompositions, batch_size=batch_size,
                                  exclude_token_ids=exclude_token_ids, no_error_check=no_error_check,
                                  progress=progress)
    if head_rows < 1:
        raise ValueError(f"head_rows must be >= 1, got {head_rows}")
    device = next(model.parameters()).device
    causal = is_causal_lm(model)
    keep_all = scored_positions(model, windows, exclude_token_ids, causal)
    recon = reconstruction_records(decompositions)
    sums = MetricSums()
    batches = [(windows[i:i + batch_size].to(device), keep_all[i:i + batch_size].to(device))
               for i in range(0, windows.shape[0], batch_size)]
    lowers, mean = _lower_runs(model, site, batches)
    bar = tqdm(total=windows.numel(), disable=not progress, desc="eval", unit="tok", unit_scale=True)
    for (ids, keep), lower in zip(batches, lowers, strict=True):
        variants = _variants(decompositions, mean, no_error_check, causal)
        _add_batch(model, lower, ids, keep, variants, recon, sums, head_rows, causal)
        bar.update(ids.numel())
    bar.close()
    return evaluation_results(sums, recon, keep_all, windows, causal)


def _lower_runs(model: nn.Module, site: str, batches: list[tuple[Tensor, Tensor]]) -> tuple[list[Lower], Tensor]:
    """The blocks below site, run once per batch, and the mean activation over the kept positions (d,) float32,
    as whole_forward.activation_mean takes it."""
    lowers, total, kept = [], None, 0
    for ids, keep in batches:
        lowers.append(run_to_site(model, site, input_ids=ids))
        x = lowers[-1].activation[keep].double()
        total = x.sum(0) if total is None else total + x.sum(0)
        kept += x.shape[0]
    return lowers, (total / kept).cpu().float()


def _add_batch(model: nn.Module, lower: Lower, ids: Tensor, keep: Tensor, variants: list,
               recon: dict[str, ReconstructionMetrics], sums: MetricSums, head_rows: int, causal: bool) -> None:
    """Every variant of one batch (B, T) from its lower run: the upper blocks batched PASS_SEQUENCES at a
    time, the recording splices into recon, the losses (causal) or embedding similarities into sums."""
    for _, _, sp in variants:
        if sp is not None:
            sp.keep = keep
    per_run = max(1, PASS_SEQUENCES // ids.shape[0])
    hidden = torch.cat([run_from_site(model, lower, [v[2] for v in variants[i:i + per_run]], input_ids=ids)
                        for i in range(0, len(variants), per_run)])  # (n, B, T, d)
    for name, (_, _, sp) in zip(list(recon), [v for v in variants if v[2] is not None and v[2].record],
                                 strict=True):
        record_splice(recon[name], sp, keep)
    if causal:
        mask = keep[:, :-1]
        sums.count += int(mask.sum())
        _head_sums(model, hidden, ids, mask, variants, head_rows, sums.add)
    else:
        sums.count += ids.shape[0]
        emb = hidden.float().mean(dim=2)  # (n, B, d) the attention-unmasked mean, as the reference
        for i, (key, _, _) in enumerate(variants[1:], start=1):
            sums.add(key, F.cosine_similarity(emb[0], emb[i], dim=-1))


def matched_k(sae, x: Tensor) -> int:
    """The baselines' k: the SAE's mean L0 on x, rounded (at least 1)."""
    with torch.no_grad():
        latents = sae.encode(x.to(sae.dtype))
    return max(1, round(float((latents.values != 0).sum()) / x.shape[0]))


def evaluate_with_baselines(model: nn.Module, site: str, windows: Tensor, saes: dict, fit_x: Tensor | None,
                            kinds: tuple[str, ...] = ("pca", "ica", "neurons", "random"),
                            seconds: dict | None = None, **kwargs) -> dict:
    """evaluate() on the SAEs plus baselines fitted on fit_x (N, d) with the first SAE's width and L0.
    The baselines are fitted on the model's device (ICA's fit is GEMMs: fastsae.evaluation.ica).
    seconds: a dict that receives the wall time of fitting the baselines and of evaluating."""
    from . import baselines

    start = time.perf_counter()
    decompositions = dict(saes)
    if kinds:
        if any(_kind(d) != "sae" for d in saes.values()):  # fitted on the in-site, they would rebuild x, not y
            raise ValueError(f"evaluate_with_baselines: baselines ({', '.join(kinds)}) of a transcoder are not "
                             "defined yet; evaluate transcoders with kinds=() (fastsae eval --baselines none)")
        if fit_x is None:
            raise ValueError("baselines need fit_x, activations to fit them on")
        fit_x = fit_x.to(next(model.parameters()).device)
        first = next(iter(saes.values()))
        k = matched_k(first, fit_x)
        for kind in kinds:
            decompositions[kind] = baselines.fit(kind, fit_x, n=first.cfg.d_sae, k=k)
    fitted = time.perf_counter()
    results = evaluate(model, site, windows, decompositions, no_error_check=tuple(kinds), **kwargs)
    if seconds is not None:
        seconds.update(fit_baselines=fitted - start, evaluate=time.perf_counter() - fitted)
    for kind in kinds:
        results[kind]["n_directions"] = decompositions[kind].d_codes
        results[kind]["k"] = decompositions[kind].k
    return results


def _kind(decomposition) -> str:
    return getattr(getattr(decomposition, "cfg", None), "kind", "sae")


# a transcoder's own out-site baselines, copied into its results (the shared "model" numbers may be another site's)
OUT_SITE_KEYS = ("ce_loss_with_ablation", "ce_loss_with_mean_ablation", "kl_div_with_ablation",
                 "kl_div_with_mean_ablation", "embedding_cossim_with_ablation", "embedding_cossim_with_mean_ablation")


def _evaluate_with_transcoders(model: nn.Module, site: str, windows: Tensor, decompositions: dict,
                               out_sites: dict[str, str], **kwargs) -> dict[str, dict]:
    """evaluate() of the SAEs (as usual) and of the transcoders, grouped by out-site, each group on the
    straightforward path with the transcoder splice (the fast path runs the upper blocks from one site)."""
    groups: dict[str, dict] = {}
    for name, d in decompositions.items():
        if _kind(d) == "sae":
            continue
        out = out_sites.get(name) or getattr(d, "metadata", {}).get("out_site")
        if not out:
            raise ValueError(f"evaluate: {name!r} is a {_kind(d)} whose output site is unknown (its metadata has no "
                             f"'out_site'): pass out_sites={{{name!r}: 'mlp_out.L'}}")
        groups.setdefault(out, {})[name] = d
    saes = {name: d for name, d in decompositions.items() if _kind(d) == "sae"}
    results = evaluate(model, site, windows, saes, **kwargs) if saes else {}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("head_rows", "reference")}
    for out, group in groups.items():
        part = evaluate_reference(model, site, windows, group, out_site=out, **kwargs)
        shared = part.pop("model")
        for m in part.values():
            m.update({k: shared[k] for k in OUT_SITE_KEYS if k in shared}, site=site, out_site=out)
        results.setdefault("model", shared)
        results.update(part)
    return {name: results[name] for name in ("model", *decompositions)}
