"""A dictionary spliced into a model, or loaded from disk, encodes each row on its own: a BatchTopK SAE by its
learnt threshold, never by the batch's top N·k. Evaluation splices with BOS rows of huge norm kept clean; in
train mode those rows took most of the batch's N·k latents (a Matryoshka BatchTopK SAE of L0 32 measured L0 7.4
on Gemma), so the other rows' reconstructions depended on the batch."""

import torch

from fastsae import SAE, SAEConfig
from fastsae.model import splice

from helpers import tiny_pythia


def _batchtopk():
    sae = SAE(SAEConfig(32, 96, activation="batchtopk", k=4), seed=0)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    return sae


def test_a_loaded_sae_is_in_eval_mode_and_encodes_rows_independently(tmp_path):
    sae = _batchtopk()
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert not loaded.training
    x = torch.randn(7, 32)
    big = torch.cat([x, 100 * torch.randn(3, 32)])  # rows of huge norm beside the same 7
    with torch.no_grad():
        alone, beside = loaded.encode(x).to_dense(), loaded.encode(big).to_dense()[:7]
    torch.testing.assert_close(beside, alone)
    # the same SAE in train mode: the batch's top N·k, which the big rows take (so the test can fail)
    loaded.train()
    with torch.no_grad():
        assert not torch.equal(loaded.encode(big).to_dense()[:7], loaded.encode(x).to_dense())


def test_splice_encodes_each_row_on_its_own_and_restores_the_mode():
    model = tiny_pythia()
    sae = SAE(SAEConfig(32, 96, activation="batchtopk", k=4), seed=0)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    assert sae.training  # as a trainer leaves it
    ids = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), splice(model, "resid_post.0", sae, record=True) as sp:
        model(input_ids=ids)
        model(input_ids=ids[:1])  # the first window alone
    assert sae.training  # restored
    together, alone = sp.reconstructions
    torch.testing.assert_close(together[:1], alone)
    sae.eval()
    with torch.no_grad():
        want = sae.decode(sae.encode(sp.activations[0]))
    torch.testing.assert_close(together, want)
