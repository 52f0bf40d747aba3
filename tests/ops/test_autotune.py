"""kernels/_autotune.py and the fp32 dot precision of kernels/_common.py: the encoders' tile candidates, the
autotuner's choice among them, and the TF32 / exact-fp32 switch the candidates are keyed on."""

import pytest
import torch

from fastsae.kernels import _autotune, _common
from fastsae.kernels._autotune import EncoderConfig, encoder_configs


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32"), (torch.float32, "ieee"),
                                             (torch.bfloat16, "ieee"), (torch.float16, "ieee")])
def test_pruned_candidates_are_a_subset_of_the_compiled_grid(dtype, precision):
    """The compile test compiles the candidates of the largest shapes; no shape may pick one outside them."""
    for k_pad in (None, 64, 128, 256):
        grid = set(encoder_configs(1 << 20, 1 << 20, k_pad, dtype, precision))
        for d_in in (1, 17, 64, 300, 4096):
            for d_sae in (1, 40, 100, 1000, 70_000):
                kept = encoder_configs(d_in, d_sae, k_pad, dtype, precision)
                assert kept and set(kept) <= grid


def test_autotuner_times_each_candidate_once_per_shape(monkeypatch):
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)
    monkeypatch.setattr(_autotune, "_chosen", {})
    monkeypatch.delenv("FASTSAE_AUTOTUNE", raising=False)
    slow = EncoderConfig(64, 128, 64, 8, 3)
    runs = []
    monkeypatch.setattr(_autotune.triton.testing, "do_bench",
                        lambda fn, **kw: (fn(), 2.0 if runs[-1] == slow else 1.0)[1])
    args = (4096, 65536, 64, torch.bfloat16, "ieee", torch.device("cpu"), runs.append)
    first = _autotune.choose("topk", *args)
    n = len(encoder_configs(4096, 65536, 64, torch.bfloat16, "ieee"))
    assert first != slow and len(runs) == n > 1
    assert _autotune.choose("topk", *args) == first and len(runs) == n  # cached: no new timing
    _autotune.choose("topk", 2048, *args[1:])  # another shape is tuned afresh
    assert len(runs) > n
    monkeypatch.setenv("FASTSAE_AUTOTUNE", "0")
    assert _autotune.choose("topk", 1024, *args[1:]) == encoder_configs(1024, 65536, 64, torch.bfloat16, "ieee")[0]


def test_fp32_matmul_defaults_to_tf32_with_an_exact_opt_out(monkeypatch):
    monkeypatch.delenv(_common.FP32_MATMUL_ENV, raising=False)
    assert _common.dot_precision(torch.float32) == "tf32"
    assert _common.dot_precision(torch.bfloat16) == "ieee"
    monkeypatch.setenv(_common.FP32_MATMUL_ENV, "ieee")
    assert _common.dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv(_common.FP32_MATMUL_ENV, "fp64")
    with pytest.raises(ValueError, match=_common.FP32_MATMUL_ENV):
        _common.dot_precision(torch.float32)
    _common.set_fp32_matmul("tf32")
    try:
        assert _common.dot_precision(torch.float32) == "tf32"  # the call wins over the environment
    finally:
        _common.set_fp32_matmul(None)
    with pytest.raises(ValueError, match="fp32 matmul mode"):
        _common.set_fp32_matmul("fast")
