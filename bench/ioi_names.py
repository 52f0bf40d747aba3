"""python -m bench.ioi_names: does an SAE's IOI ceiling follow how often its training data held the prompts' names?

    python -m bench.ioi_names --store runs/seeds/harvest-layers --sae runs/seeds/train/causal-L6-k32/sae --out DIR

Counts each IOI name (ioi.NAMES, one token after a space) among the token ids of the SAEs' training store, then
measures each SAE's ceiling (ioi_ceiling.ceiling: every latent patched, the error term left corrupted) on IOI
prompts drawn only from the GROUP most frequent names, on prompts drawn only from the GROUP least frequent, and on
prompts drawn from every name (the usual IOI prompts).
A ceiling that rises with the names' frequency points at the training data, not at the dictionary's method.
Per name, the SAE's relative error on the store's own rows of that token (Σ ||x - x̂||² / Σ ||x - x̄||², x̄ the
store's mean at the site), and its Pearson correlation with log(1 + count) over the names seen at least 5 times.

Writes DIR/ioi-names.json (atomically; a rerun recomputes it, minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from fastsae import io
from fastsae.analysis.interventions import ioi_ceiling, ioi_patching
from fastsae.analysis.interventions.ioi import NAMES, generate, single_token_names
from fastsae.analysis.sae_dirs import load_saes
from fastsae.harvest.store import ActivationStore
from fastsae.model import load, special_token_ids

GROUP = 12  # names per group: the 12 least frequent IOI names never occur in the seeds' 5.2M-token store
PROMPTS = 100
ROWS_PER_SHARD = 4_096  # random rows per shard for the store's mean
HELDOUT_ROWS = 16_384


def name_rows(store: ActivationStore, sites: set[str], token_ids: list[int]) -> tuple[dict[int, int], dict, dict]:
    """One pass over the store: each token's count, its rows at each site ({site: {token: (n, d) float32}}), and
    each site's mean over a sample of rows."""
    wanted = torch.tensor(token_ids)
    counts = dict.fromkeys(token_ids, 0)
    rows: dict[str, dict[int, list[torch.Tensor]]] = {site: {} for site in sites}
    sample: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    generator = torch.Generator().manual_seed(0)
    for index in range(len(store.shards)):
        shard = store.load_shard(index, keys=("token_ids", *sorted(sites)))
        tokens = shard["token_ids"]
        pick = torch.randperm(len(tokens), generator=generator)[:ROWS_PER_SHARD]
        for t in tokens[torch.isin(tokens, wanted)].unique().tolist():
            at = tokens == t
            counts[t] += int(at.sum())
            for site in sites:
                rows[site].setdefault(t, []).append(shard[site][at].float())
        for site in sites:
            sample[site].append(shard[site][pick].float())
    return (counts, {site: {t: torch.cat(r) for t, r in by.items()} for site, by in rows.items()},
            {site: torch.cat(parts).mean(0) for site, parts in sample.items()})


@torch.no_grad()
def relative_error(sae, x: torch.Tensor, mean: torch.Tensor) -> float:
    recon = sae.decode(sae.encode(x.to(sae.dtype))).double()
    return float((x.double() - recon).pow(2).sum() / (x.double() - mean.double()).pow(2).sum())


@torch.no_grad()
def heldout_fvu(sae, store: ActivationStore, site: str, rows: int = HELDOUT_ROWS) -> float:
    """1 − explained variance of the SAE on the store's first rows at the site, in float64."""
    parts, held = [], 0
    for i in range(len(store.shards)):  # only the shards that hold the first rows
        if held >= rows:
            break
        parts.append(store.load_shard(i, keys=(site,))[site])
        held += len(parts[-1])
    x = torch.cat(parts)[:rows].float()
    recon = sae.decode(sae.encode(x.to(sae.dtype))).double()
    x = x.double()
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _pearson(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    return float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1])


def ceiling_by_group(model, tokenizer, site: str, sae, names: list[str]) -> dict:
    prompts = generate(tokenizer, n=PROMPTS, seed=0, names=names)
    state = ioi_patching.SiteRuns(model, site, prompts, special_token_ids(model))
    patcher = ioi_patching.Patcher(model, state, ioi_patching.as_dictionary(sae), prompts, True)
    with torch.no_grad():
        c = ioi_ceiling.ceiling(patcher, state, sae, prompts)
    return {"names": names, "clean_logit_diff": state.clean_ld, "corrupted_logit_diff": state.corrupted_ld, **c}


def measure(model, tokenizer, store: ActivationStore, saes: dict, heldout: ActivationStore | None = None) -> dict:
    """saes: {path: (site, sae)} -> the report written as ioi-names.json (with each SAE's FVU on held-out rows
    where a heldout store is given)."""
    names = single_token_names(tokenizer, NAMES)
    ids = {tokenizer.encode(" " + n, add_special_tokens=False)[0]: n for n in names}
    counts, rows, means = name_rows(store, {site for site, _ in saes.values()}, list(ids))
    out = {"store": str(store.path), "store_tokens": store.tokens, "group": GROUP, "prompts": PROMPTS,
           "counts": {ids[t]: c for t, c in counts.items()}, "saes": {}}
    ranked = sorted(names, key=lambda n: (-out["counts"][n], n))
    for path, (site, sae) in saes.items():
        errors = {ids[t]: relative_error(sae, rows[site][t], means[site]) for t in ids
                  if t in rows[site] and len(rows[site][t]) >= 5}
        out["saes"][path] = {
            "site": site, "relative_error": errors,
            "error_vs_log_count_r": _pearson([math.log1p(out["counts"][n]) for n in errors], list(errors.values())),
            "all": ceiling_by_group(model, tokenizer, site, sae, names),
            "frequent": ceiling_by_group(model, tokenizer, site, sae, ranked[:GROUP]),
            "rare": ceiling_by_group(model, tokenizer, site, sae, ranked[-GROUP:])}
        if heldout is not None:
            out["saes"][path]["heldout_fvu"] = heldout_fvu(sae, heldout, site)
    counts_sorted = sorted(out["counts"].values())
    out["count_median"], out["never_seen"] = counts_sorted[len(counts_sorted) // 2], counts_sorted.count(0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--store", required=True, help="the activation store the SAEs were trained on")
    parser.add_argument("--sae", nargs="+", required=True)
    parser.add_argument("--heldout-store", help="a store of held-out text at the SAEs' sites: each SAE's FVU there")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    saes = {p: next(iter(load_saes([p]).items())) for p in args.sae}
    heldout = ActivationStore(args.heldout_store) if args.heldout_store else None
    result = measure(model, tokenizer, ActivationStore(args.store), saes, heldout)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    io.write_json(Path(args.out) / "ioi-names.json", result)
    for path, r in result["saes"].items():
        print(f"{path} ({r['site']}): names seen median {result['count_median']} times, {result['never_seen']} "
              f"never; ceiling {r['frequent']['all_latents_fraction']:.3f} on the {GROUP} most frequent names (FVU "
              f"names "
              f"{r['frequent']['fvu_names']:.3f}), {r['rare']['all_latents_fraction']:.3f} on the {GROUP} least "
              f"(FVU names {r['rare']['fvu_names']:.3f}); error vs log count r {r['error_vs_log_count_r']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
