"""JumpReLU trained through θ, against SAELens (issue #27): our gradients equal those of SAELens's own
JumpReLUTrainingSAE in each sparsity mode, and a JumpReLU that fastsae trained goes to SAELens and back
unchanged, encoding and reconstructing as SAELens's forward does."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.interop import export_saelens, read_saelens
from fastsae.train import train
from fastsae.train.train_config import TrainConfig

pytestmark = pytest.mark.optional

D_IN, D_SAE, N = 16, 40, 64


def _inputs(n=N, seed=1):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def _ours(mode: str, bandwidth: float = 0.2) -> SAE:
    cfg = SAEConfig(D_IN, D_SAE, activation="jumprelu", jumprelu_threshold=0.3, jumprelu_bandwidth=bandwidth,
                    jumprelu_sparsity=mode, l1_coefficient=0.5, k=6 if mode == "quadratic" else None)
    sae = SAE(cfg, seed=0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(D_SAE, D_IN, generator=gen))
        sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=gen))  # norms != 1: tanh weighs by them
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=gen))
        sae.threshold.copy_(0.2 + 0.3 * torch.rand(D_SAE, generator=gen))
    return sae


@pytest.mark.parametrize("mode", ["step", "tanh", "quadratic"])
def test_gradients_equal_saelens_jumprelu_training_sae(mode):
    pytest.importorskip("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    ours = _ours(mode)
    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, jumprelu_bandwidth=ours.cfg.jumprelu_bandwidth, jumprelu_sparsity_loss_mode=mode,
        target_l0=ours.cfg.k, jumprelu_tanh_scale=4.0, apply_b_dec_to_input=True))
    with torch.no_grad():
        for name in ("W_dec", "b_enc", "b_dec", "threshold"):
            getattr(theirs, name).copy_(getattr(ours, name))
        theirs.W_enc.copy_(ours.W_enc.T)
    x = _inputs()
    out = theirs.training_forward_pass(TrainStepInput(x, {"l0": ours.cfg.l1_coefficient}, None, 0, False))
    out.loss.backward()
    mine = ours(x)
    mine.loss.backward()
    torch.testing.assert_close(mine.loss, out.loss, atol=1e-5, rtol=1e-5)
    assert theirs.threshold.grad.abs().max() > 0
    for name in ("W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(ours.W_enc.grad, theirs.W_enc.grad.T, atol=1e-5, rtol=1e-4)


def test_a_trained_fastsae_jumprelu_round_trips_through_saelens(tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens import SAE as LensSAE

    sae = _ours("step", bandwidth=0.1)
    before = sae.threshold.detach().clone()
    train(sae, [_inputs(32, seed) * 2 for seed in range(10)], TrainConfig.flat(lr=1e-2, optimizer="torch"))
    assert (sae.threshold != before).any(), "θ did not train"
    path = export_saelens(sae, tmp_path / "lens")
    theirs = LensSAE.load_from_disk(str(path))
    back = SAE.from_tensors(*read_saelens(path))
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert back.threshold.requires_grad, "an imported JumpReLU trains its θ too"
    x = _inputs(seed=5) * 2
    with torch.no_grad():
        codes = theirs.encode(x)
        assert (codes > 0).any()
        for model in (sae, back):
            dense = model.encode(x).to_dense()
            assert torch.equal(dense > 0, codes > 0), "different latents are active"
            torch.testing.assert_close(dense, codes, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
