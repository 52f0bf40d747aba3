"""fastsae/ops/reference.py against itself: the dense autograd of decode and of the encoders equals the reference
pieces that the other backends build their backwards from (decode_value_grad, gather_rows, segment_sum), so a
kernel tested against a piece is tested against the reference's own gradient. Shapes are odd, latents repeat
within a row, and some slots are padding (value 0)."""

import pytest
import torch

from fastsae.ops import reference

SHAPES = [(1, 1, 5, 3), (7, 3, 11, 13), (33, 5, 37, 24)]  # (N, w, d_sae, d_in)


def _tensors(n, d_sae, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    W = torch.randn(d_sae, d, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(d_sae, generator=gen, dtype=torch.float64).requires_grad_()
    return gen, x, W, b


@pytest.mark.parametrize("n,w,d_sae,d", SHAPES)
def test_decode_gradients_are_the_value_gradient_and_the_segment_sum(n, w, d_sae, d):
    gen, _, W, _ = _tensors(n, d_sae, d, seed=n)
    b = torch.randn(d, generator=gen, dtype=torch.float64).requires_grad_()
    indices = torch.randint(0, d_sae, (n, w), generator=gen)
    indices[:, -1] = indices[:, 0]  # a latent twice in a row
    values = torch.rand(n, w, generator=gen, dtype=torch.float64)
    values[::2, -1] = 0  # padding
    values.requires_grad_()
    x_hat = reference.decode(values, indices, W, b)
    torch.testing.assert_close(x_hat, reference.gather_rows(values, indices, W) + b)
    grad = torch.randn(x_hat.shape, generator=gen, dtype=torch.float64)
    grad_values, grad_W, grad_b = torch.autograd.grad(x_hat, (values, W, b), grad)
    torch.testing.assert_close(grad_values, reference.decode_value_grad(grad, indices, W.detach()))
    torch.testing.assert_close(grad_W, reference.segment_sum(indices, values.detach(), grad, d_sae)[0])
    torch.testing.assert_close(grad_b, grad.sum(0))


ENCODERS = {
    "topk": lambda x, W, b: reference.encode_topk(x, W, b, 3),
    "relu": lambda x, W, b: reference.encode_threshold(x, W, b, None),
    "jumprelu": lambda x, W, b: reference.encode_threshold(x, W, b, torch.full((W.shape[0],), 0.3)),
    "batchtopk": lambda x, W, b: reference.encode_batchtopk(x, W, b, 2)[:2],
}


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("n,d_sae,d", [(1, 5, 3), (9, 11, 13), (33, 37, 24)])
def test_encoder_gradients_are_gather_rows_and_segment_sum(encoder, n, d_sae, d):
    """_autograd.SparseEncode's backward, written with the reference pieces, is the encoders' dense autograd."""
    gen, x, W, b = _tensors(n, d_sae, d, seed=d)
    values, indices = ENCODERS[encoder](x, W, b)
    grad = torch.randn(values.shape, generator=gen, dtype=torch.float64)
    grad_x, grad_W, grad_b = torch.autograd.grad(values, (x, W, b), grad)
    g = grad * (values.detach() > 0)  # the activation's gradient is zero wherever a latent is off
    torch.testing.assert_close(grad_x, reference.gather_rows(g, indices, W.detach()))
    seg, sums = reference.segment_sum(indices, g, x.detach(), d_sae)
    torch.testing.assert_close(grad_W, seg)
    torch.testing.assert_close(grad_b, sums)

