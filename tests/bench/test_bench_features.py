"""bench/features.py's pass in a fresh process, on a tiny store (seconds): it returns its rates and sizes."""

import pytest

from bench.features import run_pass
from fastsae.harvest import harvest_corpus
from fastsae.model import random_causal_lm


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model, tokenizer = random_causal_lm(hidden_size=32, num_layers=2, seed=0)
    out = tmp_path_factory.mktemp("s") / "store"
    return harvest_corpus(model, tokenizer, ["resid_post.1"], "english-classics", out, tokens=512, context_size=64,
                          progress=False)


def test_run_pass_reports_rate_peak_and_state(store):
    r = run_pass(store.path, "resid_post.1", 128, 4, "cpu")
    assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
    # the state holds at least the top-20 activations (float32) of every latent over its window
    assert r["state_bytes"] >= 128 * 20 * 4


def test_run_pass_names_the_failure(tmp_path):
    with pytest.raises(RuntimeError, match="the feature pass .* failed"):
        run_pass(tmp_path / "no-store", "resid_post.1", 128, 4, "cpu")  # the child's error comes back
