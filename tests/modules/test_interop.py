"""Interop with what SAELens and EleutherAI's sparsify really write: SAEs their own trainers trained and saved
(tiny models, random tokens, a few steps), imported here and compared with the other library's own forward.

Both libraries are in the dev extra, so these run in CI; they skip only where the library is missing.
"""

import json
import shutil

import pytest
import torch

from fastsae import SAE
from fastsae.interop import read_saelens, read_sparsify

pytestmark = pytest.mark.optional

D_IN, D_SAE, K = 16, 40, 4


def _inputs(scale=1.0, n=64, seed=1):
    return scale * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def _assert_same_codes(ours_dense, theirs_dense, atol=1e-5):
    """The same active latents (indices) and values, as dense (N, d_sae) tensors."""
    assert torch.equal(ours_dense > 0, theirs_dense > 0), "different latents are active"
    torch.testing.assert_close(ours_dense, theirs_dense, atol=atol, rtol=1e-5)


# ---- SAELens -------------------------------------------------------------------------------------


def _saelens_runner(out, sae_cfg, **kw):
    """SAELens's LanguageModelSAETrainingRunner on a tiny random HookedTransformer and random tokens."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=D_IN, d_head=4, n_heads=4, n_ctx=16,
                                                      d_vocab=50, act_fn="relu", d_mlp=32))
    tokens = torch.randint(1, 50, (64, 16), generator=torch.Generator().manual_seed(0))
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name="tiny", hook_name="blocks.0.hook_resid_post", dataset_path="none",
        is_dataset_tokenized=True, streaming=False, context_size=16, training_tokens=16 * 16 * 4,
        train_batch_size_tokens=64, store_batch_size_prompts=4, n_batches_in_buffer=8, n_batches_for_norm_estimate=2,
        lr=1e-2, device="cpu", logger=LoggingConfig(log_to_wandb=False), output_path=str(out / "final"),
        verbose=False, prepend_bos=False, **{"checkpoint_path": None, **kw})
    LanguageModelSAETrainingRunner(cfg, override_dataset=Dataset.from_dict({"input_ids": tokens.tolist()}),
                                   override_model=model).run()


@pytest.fixture(scope="module")
def saelens_topk_run(tmp_path_factory):
    """Its TopK training config's defaults (rescale_acts_by_decoder_norm=True, decoder rows initialised to
    norm 0.1), activations normalised with expected_average_only_in, one mid-run checkpoint (save_model)
    and the final save_inference_model."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    out = tmp_path_factory.mktemp("saelens")
    _saelens_runner(out, TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K,
                                               normalize_activations="expected_average_only_in"),
                    checkpoint_path=str(out / "checkpoints"), n_checkpoints=1)
    checkpoint = next(p.parent for p in (out / "checkpoints").rglob("sae_weights.safetensors"))
    return {"final": out / "final", "checkpoint": checkpoint}


@pytest.mark.parametrize("which", ["final", "checkpoint"])
def test_saelens_topk_trained_by_its_runner_imports_exactly(saelens_topk_run, which):
    from sae_lens import SAE as LensSAE

    path = saelens_topk_run[which]
    meta = json.loads((path / "cfg.json").read_text())
    assert meta["architecture"] == "topk" and meta["rescale_acts_by_decoder_norm"] is True
    theirs = LensSAE.load_from_disk(str(path))
    norms = theirs.W_dec.detach().norm(dim=1)
    if which == "checkpoint":  # what training left: decoder rows far from unit norm, normalisation in the cfg
        assert meta["normalize_activations"] == "expected_average_only_in"
        assert (norms - 1).abs().max() > 0.5
    imported = read_saelens(path)  # plain data: the config, fastsae-layout tensors, metadata
    assert all(isinstance(t, torch.Tensor) for t in imported.tensors.values())
    ours = SAE.from_tensors(*imported)
    assert SAE.load(path).state_dict().keys() == ours.state_dict().keys()  # SAE.load detects the format
    x = _inputs(scale=3.0)
    with torch.no_grad():
        codes = theirs.encode(x)
        _assert_same_codes(ours.encode(x).to_dense(), codes)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(codes), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
    assert ours.metadata["imported_from"]["decoder_norms_folded"]
    torch.testing.assert_close(ours.W_dec.detach().norm(dim=1), torch.ones(D_SAE))


@pytest.fixture(scope="module")
def saelens_jumprelu(tmp_path_factory):
    """A SAELens JumpReLU SAE trained by its runner, saved with save_inference_model."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig

    out = tmp_path_factory.mktemp("jumprelu")
    _saelens_runner(out, JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, jumprelu_init_threshold=0.05,
                                                   l0_coefficient=1e-3))
    return out / "final"


def test_saelens_jumprelu_negative_thresholds_follow_saelens_formula(saelens_jumprelu, tmp_path):
    """SAELens computes relu(pre)·1[pre > θ]: a threshold below 0 acts as 0 (fastsae: pre·1[pre > θ])."""
    import safetensors.torch
    from sae_lens import SAE as LensSAE

    path = tmp_path / "negative"
    shutil.copytree(saelens_jumprelu, path)
    tensors = safetensors.torch.load_file(path / "sae_weights.safetensors")
    tensors["threshold"][::2] = -0.5  # half the latents below 0
    safetensors.torch.save_file(tensors, path / "sae_weights.safetensors")
    theirs, ours = LensSAE.load_from_disk(str(path)), SAE.from_tensors(*read_saelens(path))
    assert ours.metadata["imported_from"]["negative_thresholds_set_to_0"] == int((tensors["threshold"] < 0).sum())
    x = _inputs(scale=2.0)
    with torch.no_grad():
        codes = theirs.encode(x)
        assert (codes >= 0).all()
        _assert_same_codes(ours.encode(x).to_dense(), codes)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
    tensors["threshold"][0] = float("nan")
    safetensors.torch.save_file(tensors, path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="threshold holds NaN"):
        read_saelens(path)


# ---- EleutherAI sparsify -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparsify_run(tmp_path_factory):
    """sparsify's Trainer on fastsae's tiny random GPT-NeoX: normalize_decoder=False (decoder rows of any norm)
    and multi_topk=True, checkpointed by its own save path."""
    pytest.importorskip("sparsify")
    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    from fastsae.model import random_causal_lm

    model, _ = random_causal_lm(hidden_size=D_IN, num_heads=4)
    tokens = torch.randint(4, 40, (64, 16), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("sparsify")
    cfg = TrainConfig(SparseCoderConfig(k=K, num_latents=D_SAE, normalize_decoder=False, multi_topk=True),
                      batch_size=8, layers=[1], optimizer="adam", lr=1e-2, lr_warmup_steps=1, save_every=4,
                      log_to_wandb=False, save_dir=str(out), run_name="run")
    Trainer(cfg, Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch"), model).fit()
    return out / "run"


def test_sparsify_trained_by_its_trainer_imports_exactly(sparsify_run):
    from sparsify import SparseCoder

    path = sparsify_run / "layers.1"
    meta = json.loads((path / "cfg.json").read_text())
    assert meta["multi_topk"] is True and meta["normalize_decoder"] is False
    theirs = SparseCoder.load_from_disk(path)
    assert (theirs.W_dec.detach().norm(dim=1) - 1).abs().max() > 0.1  # not unit-norm rows
    with pytest.warns(UserWarning, match=f"multi_topk SAE, imported as TopK with its k={K}.*pass k={4 * K}"):
        ours = SAE.load(path)  # detected as sparsify
    assert ours.metadata["imported_from"] == {"library": "sparsify", "path": str(path), "multi_topk": True,
                                              "trained_k": K}
    x = _inputs(scale=2.0)
    with torch.no_grad():
        enc = theirs.encode(x)
        dense = torch.zeros(x.shape[0], D_SAE).scatter_(1, enc.top_indices, enc.top_acts)
        _assert_same_codes(ours.encode(x).to_dense(), dense)
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(enc.top_acts, enc.top_indices),
                                   atol=1e-5, rtol=1e-5)
        # multi-TopK: sparsify's forward reconstructs with 4k latents
        four_k = SAE.from_tensors(*read_sparsify(path, k=4 * K))
        torch.testing.assert_close(four_k(x).x_hat, theirs(x).sae_out, atol=1e-5, rtol=1e-5)


def test_sparsify_run_directory_names_its_saes_and_d_in_comes_from_the_weights(sparsify_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds SAEs in \['layers.1'\]"):
        SAE.load(sparsify_run)
    path = tmp_path / "old"
    shutil.copytree(sparsify_run / "layers.1", path)
    meta = json.loads((path / "cfg.json").read_text())
    del meta["d_in"]  # files from before sparsify recorded it
    (path / "cfg.json").write_text(json.dumps(meta))
    x = _inputs()
    reference = SAE.from_tensors(*read_sparsify(sparsify_run / "layers.1", k=K))
    torch.testing.assert_close(SAE.from_tensors(*read_sparsify(path, k=K))(x).x_hat, reference(x).x_hat)
    (path / "cfg.json").write_text(json.dumps({**meta, "d_in": 17}))
    with pytest.raises(ValueError, match=r"d_in=17, but encoder.weight .* is \(40, 16\)"):
        read_sparsify(path, k=K)
