import os

import torch

# Kernels run in Triton's interpreter on CPU; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # EleutherAI's sparsify (the interop tests) picks its Triton decoder whenever triton imports, and it
    # fails on a machine without a GPU driver ("0 active drivers"); its eager decoder is the same math.
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import pytest  # noqa: E402

from fastsae import SAE, SAEConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_sae(d_in=13, d_sae=37, activation="relu", k=None, seed=0, dtype="float32", **kw) -> SAE:
    """An SAE with non-trivial biases, so that tests exercise every term."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, dtype=dtype, **kw), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
        if not sae.cfg.tied:
            sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen).to(sae.W_enc))
    return sae


@pytest.fixture(scope="module")
def chrome():
    """One real headless Chromium per test module (the browser pages' tests); they skip where none is installed."""
    from fastsae.analysis.features.chromium_driver import Chromium, find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium/Chrome on PATH: `make browser` installs it (apt-get install chromium)")
    with Chromium() as browser:
        yield browser
