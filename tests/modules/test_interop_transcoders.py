"""sparsify's transcoders and skip transcoders (SparseCoder with transcode=True [, skip_connection=True]), saved by
sparsify's own save_to_disk and imported here, compared with sparsify's own forward; and the reverse (fastsae's
export, loaded by sparsify). Random weights built in-process: nothing is downloaded or trained."""

import json

import pytest
import torch

from fastsae import SAE
from fastsae.interop import export_sparsify, read_sparsify

pytestmark = pytest.mark.optional

D_IN, D_SAE, K = 16, 40, 4


def _sparsify_transcoder(skip: bool, seed: int = 0):
    """A sparsify transcoder with every tensor random (its own init leaves W_dec, b_enc, b_dec, W_skip at 0)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    coder = SparseCoder(D_IN, SparseCoderConfig(k=K, num_latents=D_SAE, transcode=True, skip_connection=skip))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in coder.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return coder


def _pair(n: int = 48, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen), torch.randn(n, D_IN, generator=gen)


def _assert_matches(ours: SAE, theirs, x, y):
    """fastsae's forward(x, target=y) against sparsify's forward(x, y): output, active latents and their values."""
    with torch.no_grad():
        out, ref = ours(x, target=y), theirs(x, y)
        dense = torch.zeros(x.shape[0], D_SAE).scatter_(1, ref.latent_indices, ref.latent_acts)
        assert torch.equal(out.latents.to_dense() > 0, dense > 0), "different latents are active"
        torch.testing.assert_close(out.latents.to_dense(), dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.x_hat, ref.sae_out, atol=1e-5, rtol=1e-5)
        # sparsify's fvu is Σ(y - ŷ)² / Σ(y - ȳ)²; ours is the mean over rows of Σ_d (y - ŷ)²
        torch.testing.assert_close(out.mse * x.shape[0] / (y - y.mean(0)).pow(2).sum(), ref.fvu, rtol=1e-5, atol=0)


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_sparsify_transcoder_imports_exactly(tmp_path, skip):
    pytest.importorskip("sparsify")
    theirs = _sparsify_transcoder(skip)
    path = tmp_path / "layers.3.mlp"  # sparsify names each coder's directory by its hookpoint
    theirs.save_to_disk(path)
    ours = SAE.load(path)  # detected as sparsify
    assert ours.cfg.kind == ("skip_transcoder" if skip else "transcoder")
    assert not ours.cfg.apply_b_dec_to_input and not ours.cfg.normalize_decoder
    assert (ours.metadata["site"], ours.metadata["out_site"], ours.metadata["hookpoint"]) == \
        ("mlp_in.3", "mlp_out.3", "layers.3.mlp")
    x, y = _pair()
    _assert_matches(ours, theirs, x, y)
    if skip:  # the skip term is not dead weight in this comparison: without it, the outputs differ
        with torch.no_grad():
            no_skip = ours(x, target=y).x_hat - ours.skip(x)
        assert (no_skip - theirs(x, y).sae_out).abs().max() > 0.1


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_our_transcoder_exports_to_sparsify(tmp_path, skip):
    sparsify = pytest.importorskip("sparsify")
    ours = SAE.from_tensors(*read_sparsify(_save(_sparsify_transcoder(skip, seed=5), tmp_path / "src")))
    export_sparsify(ours, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (meta["transcode"], meta["skip_connection"]) == (True, skip)
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "out")
    x, y = _pair(seed=4)
    _assert_matches(ours, theirs, x, y)


def _save(coder, path):
    coder.save_to_disk(path)
    return path


def test_sparsify_imports_refuse_what_has_no_fastsae_kind(tmp_path):
    pytest.importorskip("sparsify")
    from sparsify import SparseCoder, SparseCoderConfig

    path = _save(SparseCoder(D_IN, SparseCoderConfig(k=K, num_latents=D_SAE, skip_connection=True)), tmp_path / "s")
    with pytest.raises(ValueError, match="skip_connection=True without transcode=True"):
        read_sparsify(path)
    # a transcoder under a hookpoint that is not an MLP: its sites are left to the caller
    imported = read_sparsify(_save(_sparsify_transcoder(False), tmp_path / "layers.2.attn"))
    assert imported.metadata == {"imported_from": imported.metadata["imported_from"], "hookpoint": "layers.2.attn"}
