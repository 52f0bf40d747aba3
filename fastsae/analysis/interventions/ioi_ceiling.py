"""What an SAE's IOI patching can reach at best, and the activations a fair PCA comparator is fitted on.

    ceiling(model, state, sae, prompts)    # patch every active latent, the error term left corrupted
    corpus_activations(model, site, windows, excluded)    # (N, d): the general corpus at site, not the prompts

The ceiling (issue 28, item 1): whatever m, patching latents edits x_corrupted -> x̂(z') + (x_corr - x̂(z_corr));
with every latent patched that is x̂_clean + error_corrupted, so the fraction of the clean logit difference it
restores bounds the SAE's whole curve. Reported beside it:
  - all_latents_kl: KL(clean || patched) of the next-token distribution at the last token, mean over prompts;
  - error_only_fraction: the error term x - x̂ patched alone, no latent;
  - everything_fraction: every latent and the error patched (x -> x_clean: 1 up to float error, a check);
  - fvu_names: the SAE's fraction of variance unexplained on the name tokens (the S2 / C column where clean
    and corrupted differ, both runs), Σ ||x - x̂||² / Σ ||x - x̄||²; fvu_patched the same over every patched
    position. A large FVU on the names is what keeps the ceiling low.
  - by_positions: where the clean behaviour passes through the site. For the name column alone ("names") and
    the positions after it ("after_names"): the fraction restored by every latent there (the ceiling at those
    positions) and by the whole activation there (latents and error: what any basis could restore, patching
    those positions only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...model import capture, keep_mask
from .latent_edits import as_dictionary


def fvu(dictionary, x: Tensor) -> float:
    """Σ ||x - x̂||² / Σ ||x - x̄||² over the rows of x (N, d), x̂ the dictionary's reconstruction, in float64."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be (N >= 2, d) activations, got shape {tuple(x.shape)}")
    dictionary = as_dictionary(dictionary)
    with torch.no_grad():
        recon = dictionary.reconstruct(dictionary.codes(x)).double()
    x = x.double()
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def name_positions(prompts) -> Tensor:
    """(B, T) bool: the column where clean and corrupted differ (S2 in the clean prompt, C in the corrupted)."""
    return prompts.clean.input_ids != prompts.corrupted.input_ids


def active_latents(codes, keep: Tensor) -> set[int]:
    """The latents non-zero at some kept position (every coefficient of a dense basis)."""
    if isinstance(codes, Tensor):
        return set(range(codes.shape[-1]))
    return set(codes.indices[keep][codes.values[keep] > 0].unique().tolist())


def ceiling(patcher, state, dictionary, prompts) -> dict:
    """The SAE's ceiling at state's site (see the module docstring), with patcher a Patcher of dictionary."""
    dictionary = as_dictionary(dictionary)
    with torch.no_grad():
        clean_codes, corrupted_codes = dictionary.codes(state.clean_x), dictionary.codes(state.corrupted_x)
    active = active_latents(clean_codes, state.keep) | active_latents(corrupted_codes, state.keep)
    everything, _, kl = patcher.measure(sorted(active))
    error_only, error_size, error_kl = patcher.measure([], patch_error=True)
    exact, _, exact_kl = patcher.measure(range(dictionary.size), patch_error=True)
    names = name_positions(prompts).to(state.keep.device) & state.keep
    gap = state.clean_ld - state.corrupted_ld
    after = (names.long().cumsum(1) > 0) & ~names & state.keep
    by_positions = {label: _at_positions(patcher, state, sorted(active), dictionary.size, where)
                    for label, where in (("names", names), ("after_names", after))}
    return {"all_latents_fraction": (everything - state.corrupted_ld) / gap, "all_latents": len(active),
            "all_latents_kl": kl, "error_only_fraction": (error_only - state.corrupted_ld) / gap,
            "by_positions": by_positions, "error_only_kl": error_kl, "error_only_relative_edit": error_size,
            "everything_fraction": (exact - state.corrupted_ld) / gap, "everything_kl": exact_kl,
            "fvu_names": fvu(dictionary, torch.cat([state.clean_x[names], state.corrupted_x[names]])),
            "fvu_patched": fvu(dictionary, torch.cat([state.clean_x[state.keep], state.corrupted_x[state.keep]]))}


def _at_positions(patcher, state, active: list[int], size: int, where: Tensor) -> dict:
    """Every active latent, then the whole activation (latents and error), patched at the positions where only."""
    gap = state.clean_ld - state.corrupted_ld
    latents_ld, _, latents_kl = patcher.measure(active, positions=where)
    whole_ld, _, whole_kl = patcher.measure(range(size), patch_error=True, positions=where)
    return {"all_latents_fraction": (latents_ld - state.corrupted_ld) / gap, "all_latents_kl": latents_kl,
            "everything_fraction": (whole_ld - state.corrupted_ld) / gap, "everything_kl": whole_kl,
            "positions": int(where.sum())}


@torch.no_grad()
def corpus_activations(model: nn.Module, site: str, windows: Tensor, excluded: Sequence[int],
                       batch_size: int = 8, max_rows: int | None = None) -> Tensor:
    """(N, d) activations at site over the real (non-excluded) tokens of corpus windows (S, T): what the
    default PCA comparator is fitted on, so that it is not fitted on the IOI prompts it is scored on."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be (S, T) token ids, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    keep = keep_mask(windows, excluded)
    parts = []
    for first in range(0, windows.shape[0], batch_size):
        x = capture(model, [site], input_ids=windows[first:first + batch_size].to(device))[site]
        parts.append(x[keep[first:first + batch_size].to(device)].float())
    out = torch.cat(parts)
    if out.shape[0] < 2:
        raise ValueError("windows: the corpus needs at least 2 real tokens to fit a PCA on")
    return out if max_rows is None else out[:max_rows]
