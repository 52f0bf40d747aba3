"""The KL + reconstruction term on a tiny randomly initialised Pythia (GPTNeoX)."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.losses import kl_div
from fastsae.model import hook_site
from fastsae.train import TrainConfig, Trainer
from fastsae.train.kl import SpliceKL

transformers = pytest.importorskip("transformers")


def tiny_pythia():
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(cfg).eval()


@pytest.mark.parametrize("site", ["gpt_neox.layers.0", "resid_post.0", "resid_pre.1", "mlp_out.0"])
def test_identity_splice_gives_zero_kl_and_a_perturbed_one_does_not(site):
    model = tiny_pythia()
    kl = SpliceKL(model, site)
    ids = torch.randint(0, 64, (3, 10))
    acts, clean = kl.clean(ids)
    assert acts.shape == (3, 10, 32)
    assert kl.kl(ids, acts, clean).abs() < 1e-6
    assert kl.kl(ids, acts + 0.5 * torch.randn_like(acts), clean) > 1e-3
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[:, -3:] = 0
    assert kl.kl(ids, acts, clean, attention_mask=mask).abs() < 1e-6


def test_kl_gradients_reach_the_sae_only():
    model = tiny_pythia()
    kl = SpliceKL(model, "gpt_neox.layers.1")
    sae = SAE(SAEConfig(32, 64, activation="topk", k=4), seed=0)
    ids = torch.randint(0, 64, (2, 8))
    acts, clean = kl.clean(ids)
    out = sae(acts)
    kl.kl(ids, out.x_hat, clean).backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_training_on_kl_lowers_the_spliced_kl():
    model = tiny_pythia()
    kl = SpliceKL(model, "gpt_neox.layers.0")
    sae = SAE(SAEConfig(32, 64, activation="topk", k=8), seed=0)
    trainer = Trainer(sae, TrainConfig.flat(lr=3e-3, progress=False, kl_coefficient=1.0), kl=kl)
    ids = [torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(40)]
    first = trainer.step(ids[0])
    for batch in ids[1:]:
        last = trainer.step(batch)
    assert first["kl"] is not None and last["kl"] < first["kl"]


def test_bad_site_and_mismatched_settings():
    with pytest.raises(ValueError, match="module path"):
        SpliceKL(tiny_pythia(), "gpt_neox.layers.9")
    with pytest.raises(ValueError, match=r"resid_post\.1"):
        SpliceKL(tiny_pythia(), "resid_post.7")
    with pytest.raises(ValueError, match="kl_coefficient"):
        Trainer(SAE(SAEConfig(32, 64)), TrainConfig.flat(kl_coefficient=1.0))


def test_inputs_leave_excluded_positions_clean_and_out_of_the_mean():
    model = tiny_pythia()
    ids = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1  # BOS opens every window
    ids[1, 4] = 0  # and a pad inside one
    excluded = [0, 1]
    kl = SpliceKL(model, "resid_post.0", exclude_token_ids=excluded, scale=2.0)
    x, kl_of = kl.inputs(ids)
    acts, clean = SpliceKL(model, "resid_post.0").clean(ids)
    keep = (ids != 0) & (ids != 1)
    assert x.shape == (int(keep.sum()), 32) == (26, 32)
    torch.testing.assert_close(x, 2.0 * acts[keep])  # the SAE sees the kept rows at the source's scale
    assert kl_of(x).abs() < 1e-6  # a perfect reconstruction of the kept rows: the excluded ones were left clean
    noisy = x + torch.randn_like(x)
    full = acts.clone()
    full[keep] = noisy / 2.0
    with hook_site(model, kl.site, lambda hidden: full):  # the same splice, every position's KL
        per_position = kl_div(clean, torch.log_softmax(model(input_ids=ids).logits.float(), -1))  # (3, 10)
    assert per_position[~keep].abs().max() > 1e-6  # the pad's KL is not 0 (it attends to spliced positions)
    torch.testing.assert_close(kl_of(noisy), per_position[keep].mean())  # the excluded positions are not counted
    with pytest.raises(ValueError, match="excluded token"):
        kl.inputs(torch.ones(2, 5, dtype=torch.long))
