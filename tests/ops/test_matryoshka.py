"""The Matryoshka loss's fused prefix decode (ops/matryoshka.py; on Triton kernels/prefix_decode.py) against its
float64 reference (the naive sum of per-prefix dense decodes): x_hat, every prefix's loss and every gradient, on
odd shapes and prefixes that match no block size; its edge cases; the config field; and an SAE trained with it."""

import copy

import pytest
import torch

from fastsae import SAE, SAEConfig, use_backend
from fastsae.kernels import prefix_decode as kernel
from fastsae.ops import backend_module, reference, triton_backend
from fastsae.ops.matryoshka import matryoshka_decode
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer

from helpers import assert_close, float64_copy, run

N, D_IN, D_SAE, W = 19, 13, 37, 6
WIDTHS = (3, 10, 29, 37)  # not multiples of anything


def _inputs(dtype, seed=0, n=N, w=W, d_sae=D_SAE, low=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(n, w, generator=gen).to(dtype)
    values[0, -1] = 0  # a padding slot: decodes to nothing, still gets its index's gradient
    indices = torch.randint(low, d_sae, (n, w), generator=gen)
    W_dec = torch.randn(d_sae, D_IN, generator=gen).to(dtype)
    b_dec = torch.randn(D_IN, generator=gen).to(dtype)
    x = torch.randn(n, D_IN, generator=gen).to(dtype)
    return values, indices, W_dec, b_dec, x


def _forward_backward(fn, inputs, widths, seed=1):
    """x_hat, loss and the gradients of (values, W_dec, b_dec, x) for random weights on both outputs."""
    leaves = [t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(inputs)]
    x_hat, loss = fn(*leaves, widths)
    gen = torch.Generator().manual_seed(seed)
    g_hat = torch.randn(x_hat.shape, generator=gen).to(x_hat.dtype)
    g_loss = torch.rand(len(widths), generator=gen, dtype=torch.float64)
    total = (x_hat.double() * g_hat.double()).sum() + (loss.double() * g_loss).sum()
    grads = torch.autograd.grad(total, [leaves[i] for i in (0, 2, 3, 4)])
    return (x_hat, loss, *grads)


NAMES = ("x_hat", "loss", "grad_values", "grad_W_dec", "grad_b_dec", "grad_x")


@pytest.mark.parametrize("backend", ["torch"])  # the triton backend's: test_triton_backend_forward_and_gradients…
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [WIDTHS, (37,), (1, 36, 37)], ids=str)
def test_fused_matches_the_float64_reference(backend, dtype, widths):
    inputs = _inputs(dtype)
    got = _forward_backward(backend_module(backend).matryoshka_decode, inputs, widths)
    want = _forward_backward(reference.matryoshka_decode, inputs, widths)
    assert got[1].shape == (len(widths),)
    for name, a, b in zip(NAMES, got, want, strict=True):
        # the losses are sums over rows of d_in squares: their error scales with the sum
        assert_close(a, b, dtype, scale=10.0 if name == "loss" else 1.0, msg=name)


def test_float64_inputs_give_the_reference_to_rounding():
    """With float64 inputs the fused path accumulates in float64 too: the prefix sharing is exact algebra."""
    inputs = _inputs(torch.float64, seed=3)
    got = _forward_backward(matryoshka_decode, inputs, WIDTHS)
    want = _forward_backward(reference.matryoshka_decode, inputs, WIDTHS)
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_one_prefix_is_the_plain_sae_loss():
    values, indices, W_dec, b_dec, x = _inputs(torch.float32, seed=4)
    x_hat, loss = matryoshka_decode(values, indices, W_dec, b_dec, x, (D_SAE,))
    plain = backend_module("torch").decode(values, indices, W_dec, b_dec)
    torch.testing.assert_close(x_hat, plain)
    torch.testing.assert_close(loss[0], (x - plain).square().sum(1).mean())


def test_a_prefix_without_an_active_latent_is_the_bias_alone():
    values, indices, W_dec, b_dec, x = _inputs(torch.float32, seed=5, low=10)  # no latent below 10 fires
    widths = (4, 10, D_SAE)
    got = _forward_backward(matryoshka_decode, (values, indices, W_dec, b_dec, x), widths)
    want = _forward_backward(reference.matryoshka_decode, (values, indices, W_dec, b_dec, x), widths)
    bias_only = (x - b_dec).square().sum(1).mean()
    torch.testing.assert_close(got[1][:2], bias_only.expand(2))
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert_close(a, b, torch.float32, scale=10.0 if name == "loss" else 1.0, msg=name)


def test_one_row_and_repeated_latents():
    values, _, W_dec, b_dec, x = _inputs(torch.float32, seed=6, n=1, w=4)
    indices = torch.tensor([[5, 5, 2, 36]])  # a latent twice: both entries count, as in decode
    got = _forward_backward(matryoshka_decode, (values, indices, W_dec, b_dec, x), WIDTHS)
    want = _forward_backward(reference.matryoshka_decode, (values, indices, W_dec, b_dec, x), WIDTHS)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert_close(a, b, torch.float32, scale=10.0 if name == "loss" else 1.0, msg=name)


@pytest.mark.parametrize("widths,match", [
    ((3, 3, 37), "strictly increasing"),
    ((10, 3, 37), "strictly increasing"),
    ((3, 10), "end with d_sae"),
    ((0, 37), r"\[1, d_sae"),
    ((), "non-empty"),
    ((3.0, 37), "ints"),
])
@pytest.mark.parametrize("fn", [matryoshka_decode, reference.matryoshka_decode], ids=["fused", "reference"])
def test_bad_widths_are_refused_naming_the_argument(fn, widths, match):
    with pytest.raises(ValueError, match=f"widths must.*{match}"):
        fn(*_inputs(torch.float32), widths)


# ---- the Triton kernel (kernels/prefix_decode.py) and the triton backend built on it -------------------
# fp32 and bf16 (upcast in the interpreter: a looser tolerance); padding entries and rows whose entries share one
# bucket; on a CUDA machine the same tests run compiled.


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KW, KWIDTHS = 5, (3, 10, 37)  # the kernel tests' entries per row and prefixes


def _kernel_inputs(dtype, seed=0):
    """Random entries, with padding slots (value 0, index 0 and a repeated index) and rows whose entries all
    lie in one bucket: row 1 in the first prefix, row 2 in the last bucket, row 3 in the middle one."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(N, KW, generator=gen) + 0.1
    indices = torch.randint(0, D_SAE, (N, KW), generator=gen)
    values[0, -2:] = 0  # padding, as the threshold encoders write it
    indices[0, -2:] = 0
    values[4, 0] = 0  # padding on an index another slot of the row holds
    indices[4, 0] = indices[4, 1]
    indices[1] = torch.randint(0, KWIDTHS[0], (KW,), generator=gen)
    indices[2] = torch.randint(KWIDTHS[1], D_SAE, (KW,), generator=gen)
    indices[3] = torch.randint(KWIDTHS[0], KWIDTHS[1], (KW,), generator=gen)
    W_dec = torch.randn(D_SAE, D_IN, generator=gen)
    b_dec = torch.randn(D_IN, generator=gen)
    x = torch.randn(N, D_IN, generator=gen)
    return [t.to(DEVICE) if t.dtype == torch.int64 else t.to(dtype).to(DEVICE)
            for t in (values, indices, W_dec, b_dec, x)]


def _device_forward_backward(fn, inputs, widths, seed=1):
    """x_hat, loss and the gradients of (values, W_dec, b_dec, x) for random weights on both outputs."""
    leaves = [t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(inputs)]
    x_hat, loss = fn(*leaves, widths)
    gen = torch.Generator().manual_seed(seed)
    g_hat = torch.randn(x_hat.shape, generator=gen).to(DEVICE)
    g_loss = torch.rand(len(widths), generator=gen, dtype=torch.float64).to(DEVICE)
    total = (x_hat.double() * g_hat.double()).sum() + (loss.double() * g_loss).sum()
    return (x_hat, loss, *torch.autograd.grad(total, [leaves[i] for i in (0, 2, 3, 4)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [KWIDTHS, (D_SAE,), (1, 36, D_SAE)], ids=str)
def test_kernel_matches_the_float64_reference(dtype, widths):
    inputs = _kernel_inputs(dtype)
    x_hat, loss = kernel.prefix_decode(*inputs, widths)
    want_hat, want_loss = reference.matryoshka_decode(*inputs, widths)
    assert x_hat.dtype == dtype and loss.dtype == torch.float32 and loss.shape == (len(widths),)
    assert_close(x_hat, want_hat, dtype)
    assert_close(loss, want_loss, dtype, scale=10.0)  # a sum over rows of d_in squares


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [KWIDTHS, (D_SAE,), (1, 36, D_SAE)], ids=str)
def test_triton_backend_forward_and_gradients_match_the_reference(dtype, widths):
    inputs = _kernel_inputs(dtype, seed=2)
    before = triton_backend.STATS["matryoshka_fused"]
    got = _device_forward_backward(triton_backend.matryoshka_decode, inputs, widths)
    assert triton_backend.STATS["matryoshka_fused"] == before + 1  # the kernel ran, not the torch path
    want = _device_forward_backward(reference.matryoshka_decode, inputs, widths)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert_close(a, b, dtype, scale=10.0 if name == "loss" else 1.0, msg=name)


def test_kernel_with_one_prefix_is_the_plain_decode():
    inputs = _kernel_inputs(torch.float32, seed=3)
    x_hat, loss = kernel.prefix_decode(*inputs, (D_SAE,))
    plain = triton_backend.decode(*inputs[:4])
    torch.testing.assert_close(x_hat, plain)
    torch.testing.assert_close(loss[0], (inputs[4] - plain).square().sum(1).mean())


def test_kernel_row_in_one_bucket_adds_to_its_own_prefix_only():
    """One row, all its entries in the middle bucket: the first prefix's loss is the bias alone, the middle
    and the last are the same full reconstruction's."""
    values, indices, W_dec, b_dec, x = (t[3:4] if t.shape[0] == N else t for t in _kernel_inputs(torch.float32))
    _, loss = kernel.prefix_decode(values, indices, W_dec, b_dec, x, KWIDTHS)
    torch.testing.assert_close(loss[0], (x - b_dec).square().sum())
    torch.testing.assert_close(loss[1], loss[2])
    assert not torch.allclose(loss[0], loss[1])


def test_kernel_gives_the_same_bits_on_every_run():
    inputs = _kernel_inputs(torch.float32, seed=4)
    first, again = kernel.prefix_decode(*inputs, KWIDTHS), kernel.prefix_decode(*inputs, KWIDTHS)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_triton_backend_takes_the_torch_path_for_float64():
    inputs = _kernel_inputs(torch.float64, seed=5)
    before = triton_backend.STATS["matryoshka_float64_torch"]
    x_hat, loss = triton_backend.matryoshka_decode(*inputs, KWIDTHS)
    assert triton_backend.STATS["matryoshka_float64_torch"] == before + 1 and loss.dtype == torch.float64
    want_hat, want_loss = reference.matryoshka_decode(*inputs, KWIDTHS)
    torch.testing.assert_close(loss, want_loss, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.__setitem__(4, a[4][:-1]), "x must have shape"),
    (lambda a: a.__setitem__(1, a[1][:, :-1]), "indices must have the shape of values"),
    (lambda a: a.__setitem__(3, a[3][:-1]), "bias must have shape"),
    (lambda a: a.__setitem__(5, (10, 3, D_SAE)), "widths must be strictly increasing"),
    (lambda a: a.__setitem__(5, (3, 10)), "end with d_sae"),
])
def test_kernel_refuses_bad_input_naming_the_argument(change, match):
    args = [*_kernel_inputs(torch.float32), KWIDTHS]
    change(args)
    with pytest.raises(ValueError, match=match):
        kernel.prefix_decode(*args)


# ---- the config and the SAE ------------------------------------------------------------------------


@pytest.mark.parametrize("widths,match", [([4, 4], "strictly increasing"), ([8, 4], "strictly increasing"),
                                          ([4, 64], r"\[1, d_sae"), ([0, 8], r"\[1, d_sae"), ("8", "list of ints"),
                                          ([], "list of ints"), ([True], "list of ints")])
def test_config_refuses_bad_widths_naming_the_field(widths, match):
    with pytest.raises(ValueError, match=rf"SAEConfig\.matryoshka_widths must.*{match}"):
        SAEConfig(d_in=8, d_sae=32, activation="topk", k=2, matryoshka_widths=widths)


def test_config_appends_d_sae_and_round_trips_through_cfg_json(tmp_path):
    cfg = SAEConfig(d_in=8, d_sae=32, activation="topk", k=2, matryoshka_widths=[4, 16])
    assert cfg.matryoshka_widths == (4, 16, 32)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    sae = SAE(cfg, seed=0)
    sae.save(tmp_path / "sae")
    assert SAE.load(tmp_path / "sae").cfg == cfg
    assert SAEConfig(d_in=8, d_sae=32).matryoshka_widths is None


@pytest.mark.parametrize("activation,k", [("topk", 4), ("batchtopk", 4), ("relu", None)])
def test_sae_trains_on_the_mean_of_its_prefix_losses(activation, k):
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, k=k, matryoshka_widths=[5, 20])
    sae = SAE(cfg, seed=0)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(7))
    out, grads = run(sae, x, "torch")
    plain = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, k=k), seed=0)
    plain.load_state_dict(sae.state_dict())
    torch.testing.assert_close(out.mse, plain(x).mse)  # the reported mse stays the whole dictionary's
    torch.testing.assert_close(out.mse, out.prefix_mse[-1])
    l1 = 0.0 if out.l1 is None else cfg.l1_coefficient * out.l1
    torch.testing.assert_close(out.loss, out.prefix_mse.mean() + l1)
    z = out.latents.to_dense().detach()  # (N, d_sae): the first prefix decodes latents 0:5 alone
    first = (x - z[:, :5] @ sae.W_dec[:5].detach() - sae.b_dec.detach()).square().sum(1).mean()
    torch.testing.assert_close(out.prefix_mse[0], first)
    ref_out, ref_grads = run(float64_copy(sae), x.double(), "reference")
    assert_close(out.prefix_mse, ref_out.prefix_mse, torch.float32, scale=10.0)
    for name, g in grads.items():
        assert_close(g, ref_grads[name], torch.float32, scale=10.0, msg=name)


def test_sae_compiles_with_the_matryoshka_loss():
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="topk", k=4, matryoshka_widths=[5, 20])
    sae = SAE(cfg, seed=0)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(8))
    eager_out, eager_grads = run(sae, x, "torch")
    compiled = copy.deepcopy(sae)
    with use_backend("torch"):
        out = torch.compile(compiled)(x)
    out.loss.backward()
    torch.testing.assert_close(out.prefix_mse, eager_out.prefix_mse)
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=name)


def _trained_prefix_mse(widths, steps=100):
    toy = ToyDictionary.random(d_in=12, n_features=40, active_per_sample=3.0, seed=0)
    sae = SAE(SAEConfig(12, 48, activation="topk", k=4, matryoshka_widths=widths), seed=0)
    result = Trainer(sae, TrainConfig.flat(lr=3e-3, total_steps=steps, progress=False, log_every=10)).fit(
        toy.batches(64, steps))
    assert result.history and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    probe = next(iter(toy.batches(256, 1, seed=9)))  # held-out rows
    with torch.no_grad():
        latents = sae.encode(probe)
        return matryoshka_decode(latents.values, latents.indices, sae.W_dec, sae.b_dec, probe, (8, 24, 48))[1]


def test_a_matryoshka_sae_trains_with_the_trainer():
    """Trained on its nested losses, the first 8 and 24 latents rebuild held-out rows better than those of a
    plain TopK SAE trained alike, which spends them on no particular order (0.54 against 0.70 and 0.27
    against 0.37 when written), for a slightly worse whole (0.15 against 0.13)."""
    nested, plain = _trained_prefix_mse([8, 24]), _trained_prefix_mse(None)
    assert bool((nested[:2] < 0.9 * plain[:2]).all()), (nested, plain)
    assert float(nested[2]) < 0.25, nested  # the whole dictionary learnt too (about 1.0 at initialisation)
