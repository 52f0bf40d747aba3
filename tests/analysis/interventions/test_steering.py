"""Steering on a tiny random model: the steered forward and generation equal a hand-written hook that adds
α W_dec[i] at every non-BOS position."""

import pytest
import torch

from fastsae.analysis.interventions import steering_sweep
from fastsae.model import hook_site, random_causal_lm

from conftest import make_sae

pytest.importorskip("transformers")
SITE = "resid_post.0"


def _by_hand(model, tok, sae, latent, alpha, prompt, n):
    """Greedy tokens without a cache, the steering vector added by a plain hook at positions >= 1 (after BOS)."""
    ids = torch.tensor([[tok.bos_token_id, *tok(prompt).input_ids]])

    def add(x):
        x = x.clone()
        x[:, 1:] += alpha * sae.W_dec[latent]
        return x

    out, first = [], None
    with torch.no_grad(), hook_site(model, SITE, add):
        for _ in range(n):
            logits = model(input_ids=ids).logits[0, -1]
            first = logits if first is None else first
            nxt = int(logits.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out, torch.log_softmax(first, -1)


def test_steered_text_and_next_token_shift_match_a_hand_written_hook(tmp_path):
    model, tok = random_causal_lm()
    sae = make_sae(32, 40, "topk", k=5)
    result = steering_sweep.steer(model, tok, SITE, sae, 7, "the cat", alphas=(0.0, 3.0, -8.0), max_new_tokens=6)
    assert [r["alpha"] for r in result["rows"]] == [0.0, 3.0, -8.0]
    assert result["rows"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    for row in result["rows"]:
        tokens, logp0 = _by_hand(model, tok, sae, 7, row["alpha"], "the cat", 6)
        assert row["token_ids"] == tokens
        assert row["top_tokens"][0][1] == pytest.approx(float(logp0.exp().max()), abs=1e-5)
    _, base = _by_hand(model, tok, sae, 7, 0.0, "the cat", 1)
    _, steered = _by_hand(model, tok, sae, 7, -8.0, "the cat", 1)
    assert result["rows"][2]["kl"] == pytest.approx(float((steered.exp() * (steered - base)).sum()), rel=1e-4)
    assert result["rows"][2]["kl"] > 1e-3
    assert "α=-8" in steering_sweep.format_result(result)
    steering_sweep.plot(result, tmp_path / "steer.png")
    assert (tmp_path / "steer.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="latent must be in"):
        steering_sweep.steer(model, tok, SITE, sae, 40, "the cat")
