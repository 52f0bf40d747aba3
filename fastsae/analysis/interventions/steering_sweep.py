"""Steering: generate with one latent's decoder direction added at a site, for a list of strengths α, and see how
the next-token distribution moves.

    result = steer(model, tokenizer, "resid_post.6", sae, 1234, "I think that", alphas=(0, 5, 20))
    print(format_result(result))

α is in the latent's own units (z_i -> z_i + α, i.e. x -> x + α W_dec[i] at every real non-BOS position, the
generated ones included), so the latent's typical activation (its max on the prompt is reported) says what
a large α is. A transcoder (site its in-site) is steered at its out-site, where its decoder writes: y -> y + α
W_dec[i] there (result["out_site"]). For each α: the greedy continuation, and at the prompt's last position the
KL divergence KL(p_α || p_0) from the unsteered next-token distribution, its top tokens, and the tokens whose
log-probability rose most.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ... import io
from ...model import special_token_ids
from .latent_edits import Intervention, SAEDictionary, hook_interventions
from .padded_prompts import PromptBatch, last_logits


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


@torch.no_grad()
def steer(model: nn.Module, tokenizer, site: str, sae, latent: int, prompt: str, *,
          alphas: Sequence[float] = (0.0, 2.0, 5.0, 10.0, 20.0), max_new_tokens: int = 24, top: int = 5) -> dict:
    """Steered continuations and next-token shifts of prompt for every α (see the module docstring)."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent must be in [0, {sae.cfg.d_sae}), got {latent}")
    start = time.perf_counter()
    device = next(model.parameters()).device
    batch = PromptBatch.from_texts(tokenizer, [prompt]).to(device)
    keep = batch.keep(special_token_ids(model, tokenizer))
    record = Intervention(sae, record=True)
    with hook_interventions(model, {site: record}):
        base = torch.log_softmax(last_logits(model, batch)[0], -1)  # (V,)
    on_prompt = SAEDictionary(sae).values(record.codes[0], torch.tensor([latent], device=device))[0, :, 0]
    rows, logps = [], []
    for alpha in alphas:
        iv = Intervention(sae, steer={latent: float(alpha)}, positions=keep)
        with hook_interventions(model, {site: iv}):
            logp = torch.log_softmax(last_logits(model, batch)[0], -1)
            out = model.generate(**{k: v for k, v in batch.inputs().items() if k != "position_ids"},
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, batch.input_ids.shape[1]:].tolist()
        logps.append(logp)
        kl = float((logp.exp() * (logp - base)).sum())
        rise = logp - base
        rise[logp.exp() < 1e-4] = -float("inf")  # tokens still unlikely are not what steering does
        rows.append({"alpha": float(alpha), "text": _decode(tokenizer, new), "token_ids": new, "kl": kl,
                     "top_tokens": [[tokenizer.decode([i]), float(logp[i].exp())] for i in logp.topk(top).indices],
                     "promoted": [[tokenizer.decode([i]), float(rise[i])] for i in rise.topk(top).indices
                                  if rise[i] > -float("inf")]})
    # the tokens promoted most at the strongest α, followed across every α
    strongest = max(range(len(rows)), key=lambda i: abs(rows[i]["alpha"]))
    watched = [tokenizer.encode(t, add_special_tokens=False) for t, _ in rows[strongest]["promoted"][:3]]
    watched = [ids[0] for ids in watched if len(ids) == 1]
    for row, logp in zip(rows, logps, strict=True):
        row["watched"] = {tokenizer.decode([i]): float(logp[i].exp()) for i in watched}
    where = {"site": site, **({"out_site": record.out_site} if record.out_site else {})}
    return {**where, "latent": latent, "prompt": prompt, "latent_max_on_prompt": float(on_prompt.max()),
            "max_new_tokens": max_new_tokens, "rows": rows, "seconds": time.perf_counter() - start}


def format_result(result: dict) -> str:
    lines = [f"latent {result['latent']} at {result['site']} (max {result['latent_max_on_prompt']:.3g} on the "
             f"prompt), prompt: {result['prompt']!r}"]
    for row in result["rows"]:
        top = ", ".join(f"{t!r} {p:.2f}" for t, p in row["top_tokens"][:3])
        promoted = ", ".join(f"{t!r} +{d:.2f}" for t, d in row["promoted"][:3])
        lines.append(f"α={row['alpha']:<8g} KL {row['kl']:.3f}  next: {top}  rose: {promoted}")
        lines.append(f"    {result['prompt']}{row['text']!s}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """KL from the unsteered next-token distribution, and the probability of the tokens steering promotes most
    at the strongest α, against α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    alphas = [r["alpha"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(alphas, [r["kl"] for r in rows], "o-")
    left.set_xlabel("α (latent units)")
    left.set_ylabel("KL(p_α || p_0) at the next token")
    for token in rows[0]["watched"]:
        right.plot(alphas, [r["watched"][token] for r in rows], "o-", label=repr(token))
    right.set_xlabel("α (latent units)")
    right.set_ylabel("next-token probability")
    right.legend(fontsize=8)
    fig.suptitle(f"steering latent {result['latent']} at {result['site']}", fontsize=10)
    fig.tight_layout()
    io.write_figure(path, fig)
    plt.close(fig)


def run_steer(model_name: str, sae_path: str, latent: int, prompt: str, out, *, site: str | None = None,
              alphas: Sequence[float] = (0.0, 2.0, 5.0, 10.0, 20.0), max_new_tokens: int = 24,
              device: str = "cpu") -> dict:
    """`fastsae steer`: steer() with an SAE from its directory; writes out/steer.json and out/steer.png."""
    from ...model import load
    from ..sae_dirs import load_saes

    out = Path(out)
    model, tokenizer = load(model_name, device=device)
    ((site, sae),) = load_saes([sae_path], [site] if site else None, device=device).items()
    result = steer(model, tokenizer, site, sae, latent, prompt, alphas=alphas, max_new_tokens=max_new_tokens)
    result["model"] = model_name
    result["summary"] = format_result(result)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "steer.json", result)
    plot(result, out / "steer.png")
    return result
