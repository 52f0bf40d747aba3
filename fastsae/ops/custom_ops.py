"""The encoders and decode as `torch.library` custom ops, so that `torch.compile` sees each as one node.

Dynamo cannot trace the backends' ops: they sync to the host (a row's width is `int(counts.max())`), call
oneDNN's linear, which Inductor cannot lower with a bias it did not pack (ops/cpu_gemm.py), and hold
Triton launches and Python state (the threshold encoder's capacity hint). Registered as custom ops they
stay opaque: each runs the backend in force eagerly, exactly the code an uncompiled SAE runs, and the
compiler works around them.

    fastsae::encode_topk(x, W_enc, b_enc, k)              -> values, indices       (N, k)
    fastsae::encode_threshold(x, W_enc, b_enc, threshold) -> values, indices       (N, w)
    fastsae::encode_batchtopk(x, W_enc, b_enc, k)         -> values, indices, tau  (N, w), ()
    fastsae::encode_jumprelu(x, W_enc, b_enc, θ, ε)       -> values, indices, window (N, w) (ops/jumprelu.py)
    fastsae::decode(values, indices, W_dec, b_dec)        -> x_hat                 (N, d_in)

and their backwards, `fastsae::encode_grads` (the SparseEncode backward of ops/_autograd.py) and
`fastsae::decode_grads` (the backends' decode backward), are custom ops too. The fake (meta)
implementations give the shapes: TopK's width is k; the width of ReLU, JumpReLU and BatchTopK latents is
the largest count of a row, known only after the kernel ran, so their fakes return a new unbacked size
(`torch.library.get_ctx().new_dynamic_size()`), the documented form for data-dependent output shapes.

`fastsae.ops.backend_for` hands this module out only while Dynamo traces (`torch.compiler.is_compiling()`),
so eager calls keep the backends' own autograd Functions and pay nothing for the dispatcher. The
reference backend is plain differentiable PyTorch and is traced as it is. Autocast is switched off inside
the ops: their outputs have the input's dtype, as the fakes promise, and on CPU that is what eager
autocast gives too (oneDNN's fp32 GEMM is not an autocast op).
"""

import contextlib
from typing import Optional  # the op signatures' annotation; custom_op parses it in every torch since 2.4

import torch
from torch import Tensor

from . import jumprelu, matryoshka
from .backend_choice import backend_module, get_backend

_MUTATES: tuple = ()


def _backend(device: torch.device):
    name = get_backend(device)
    if name == "reference":  # a backend switched between tracing and running: the same math, sparse
        name = "torch"
    return backend_module(name)


@contextlib.contextmanager
def _eager(device: torch.device):
    """The backend's forward as its autograd Function runs it: no grad (oneDNN's GEMM applies), no autocast."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


# ---- encoders ---------------------------------------------------------------------------------------


@torch.library.custom_op("fastsae::encode_topk", mutates_args=_MUTATES)
def _encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    with _eager(x.device):
        values, indices = _backend(x.device).encode_topk(x, W_enc, b_enc, k)
    return values.contiguous(), indices.contiguous()


@_encode_topk.register_fake
def _(x, W_enc, b_enc, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("fastsae::encode_threshold", mutates_args=_MUTATES)
def _encode_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Optional[Tensor]  # noqa: UP045
                      ) -> tuple[Tensor, Tensor]:
    with _eager(x.device):
        values, indices = _backend(x.device).encode_threshold(x, W_enc, b_enc, threshold)
    return values.contiguous(), indices.contiguous()


def _compact_fake(x: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    # width: the most latents any row keeps, >= 1 (an all-zero row keeps one padding slot); no static max,
    # since d_sae is symbolic when Dynamo marks shapes dynamic
    width = torch.library.get_ctx().new_dynamic_size(min=1)
    return x.new_empty(x.shape[0], width), x.new_empty(x.shape[0], width, dtype=torch.int64)


@_encode_threshold.register_fake
def _(x, W_enc, b_enc, threshold):
    return _compact_fake(x, W_enc.shape[0])


@torch.library.custom_op("fastsae::encode_jumprelu", mutates_args=_MUTATES)
def _encode_jumprelu(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, bandwidth: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The active latents and the halo, and the window (ops/jumprelu.py); θ's gradient is added outside, by
    jumprelu.attach_threshold (its backward is torch ops on the (N, w) slots, which Dynamo traces)."""
    with _eager(x.device):
        values, indices, window = _backend(x.device).encode_jumprelu(x, W_enc, b_enc, threshold, bandwidth)
    return values.contiguous(), indices.contiguous(), window.contiguous()


@_encode_jumprelu.register_fake
def _(x, W_enc, b_enc, threshold, bandwidth):
    values, indices = _compact_fake(x, W_enc.shape[0])
    return values, indices, torch.empty_like(indices, dtype=torch.bool)


@torch.library.custom_op("fastsae::encode_batchtopk", mutates_args=_MUTATES)
def _encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    with _eager(x.device):
        values, indices, tau = _backend(x.device).encode_batchtopk(x, W_enc, b_enc, k)
    return values.contiguous(), indices.contiguous(), tau.clone()  # tau may be a view into a buffer


@_encode_batchtopk.register_fake
def _(x, W_enc, b_enc, k):
    return (*_compact_fake(x, W_enc.shape[0]), x.new_empty((), dtype=torch.float32))


@torch.library.custom_op("fastsae::encode_grads", mutates_args=_MUTATES)
def _encode_grads(grad_values: Tensor, x: Tensor, W_enc: Tensor, values: Tensor, indices: Tensor,
                  need_x: bool, need_W: bool) -> tuple[Tensor, Tensor, Tensor]:
    """SparseEncode.backward: grad_x (N, d_in), grad_W (d_sae, d_in), grad_b (d_sae,); empty where not needed."""
    prims = _backend(x.device).PRIMS
    g = grad_values * (values > 0)
    grad_x, grad_W, grad_b = x.new_empty(0), W_enc.new_empty(0), W_enc.new_empty(0)
    with _eager(x.device):
        if need_x:
            grad_x = prims.gather_rows(g.to(W_enc.dtype), indices, W_enc).to(x.dtype)
        if need_W:
            grad_W, grad_b = prims.segment_sum(indices, g, x, W_enc.shape[0])
            grad_W, grad_b = grad_W.to(W_enc.dtype), grad_b.to(W_enc.dtype)
    return grad_x.contiguous(), grad_W.contiguous(), grad_b.contiguous()


@_encode_grads.register_fake
def _(grad_values, x, W_enc, values, indices, need_x, need_W):
    grad_x = x.new_empty(x.shape if need_x else (0,))
    grad_W = W_enc.new_empty(W_enc.shape if need_W else (0,))
    return grad_x, grad_W, W_enc.new_empty(W_enc.shape[:1] if need_W else (0,))


def _encode_setup(ctx, inputs, output) -> None:
    x, W_enc = inputs[0], inputs[1]
    ctx.save_for_backward(x, W_enc, output[0], output[1])


def _encode_backward(ctx, grad_values: Tensor, *_grad_rest):
    x, W_enc, values, indices = ctx.saved_tensors
    need_x, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_W, grad_b = torch.ops.fastsae.encode_grads(grad_values, x, W_enc, values, indices, need_x, need_W)
    return (grad_x if need_x else None, grad_W if need_W else None, grad_b if need_W else None, None)


for _op in (_encode_topk, _encode_threshold, _encode_batchtopk):
    _op.register_autograd(_encode_backward, setup_context=_encode_setup)
_encode_jumprelu.register_autograd(lambda ctx, *grads: (*_encode_backward(ctx, *grads), None),
                                   setup_context=_encode_setup)


# ---- decode -----------------------------------------------------------------------------------------


@torch.library.custom_op("fastsae::decode", mutates_args=_MUTATES)
def _decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    with _eager(values.device):
        return _backend(values.device).decode(values, indices, W_dec, b_dec).contiguous()


@_decode.register_fake
def _(values, indices, W_dec, b_dec):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1], dtype=torch.promote_types(W_dec.dtype, b_dec.dtype))


@torch.library.custom_op("fastsae::decode_grads", mutates_args=_MUTATES)
def _decode_grads(grad: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, need_values: bool,
                  need_W: bool) -> tuple[Tensor, Tensor]:
    """The backends' decode backward: grad_values (N, w), grad_W (d_sae, d_in); empty where not needed."""
    with _eager(grad.device):
        grad_values, grad_W = _backend(grad.device).decode_grads(grad, values, indices, W_dec, need_values, need_W)
    return (values.new_empty(0) if grad_values is None else grad_values.contiguous(),
            W_dec.new_empty(0) if grad_W is None else grad_W.contiguous())


@_decode_grads.register_fake
def _(grad, values, indices, W_dec, need_values, need_W):
    return values.new_empty(values.shape if need_values else (0,)), W_dec.new_empty(W_dec.shape if need_W else (0,))


def _decode_setup(ctx, inputs, output) -> None:
    values, indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.b_dtype = b_dec.dtype


def _decode_backward(ctx, grad: Tensor):
    values, indices, W_dec = ctx.saved_tensors
    need_values, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_values, grad_W = torch.ops.fastsae.decode_grads(grad, values, indices, W_dec, need_values, need_W)
    grad_b = grad.float().sum(0).to(ctx.b_dtype) if ctx.needs_input_grad[3] else None
    return (grad_values if need_values else None, None, grad_W if need_W else None, grad_b)


_decode.register_autograd(_decode_backward, setup_context=_decode_setup)


# ---- the Matryoshka prefix decode -------------------------------------------------------------------


@torch.library.custom_op("fastsae::matryoshka_decode", mutates_args=_MUTATES)
def _matryoshka_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                       widths: list[int]) -> tuple[Tensor, Tensor]:
    with _eager(values.device):
        x_hat, loss = _backend(values.device).matryoshka_decode(values, indices, W_dec, b_dec, x, tuple(widths))
    return x_hat.contiguous(), loss.contiguous()


@_matryoshka_decode.register_fake
def _(values, indices, W_dec, b_dec, x, widths):
    acc = torch.promote_types(W_dec.dtype, torch.float32)
    return W_dec.new_empty(values.shape[0], W_dec.shape[1]), W_dec.new_empty(len(widths), dtype=acc)


@torch.library.custom_op("fastsae::matryoshka_grads", mutates_args=_MUTATES)
def _matryoshka_grads(grad_x_hat: Tensor, grad_loss: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor,
                      b_dec: Tensor, x: Tensor, x_hat: Tensor, widths: list[int]
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ops/matryoshka.py's backward: grad_values, grad_W_dec, grad_b_dec, grad_x."""
    with _eager(values.device):
        grads = matryoshka.backward(grad_x_hat, grad_loss, values, indices, W_dec, b_dec, x, x_hat, tuple(widths))
    return tuple(g.contiguous() for g in grads)


@_matryoshka_grads.register_fake
def _(grad_x_hat, grad_loss, values, indices, W_dec, b_dec, x, x_hat, widths):
    return torch.empty_like(values), torch.empty_like(W_dec), torch.empty_like(b_dec), torch.empty_like(x)


def _matryoshka_setup(ctx, inputs, output) -> None:
    values, indices, W_dec, b_dec, x, widths = inputs
    ctx.save_for_backward(values, indices, W_dec, b_dec, x, output[0])
    ctx.widths = widths


def _matryoshka_backward(ctx, grad_x_hat: Tensor | None, grad_loss: Tensor | None):
    values, indices, W_dec, b_dec, x, x_hat = ctx.saved_tensors
    grad_x_hat = torch.zeros_like(x_hat) if grad_x_hat is None else grad_x_hat
    grad_loss = x_hat.new_zeros(len(ctx.widths), dtype=torch.promote_types(W_dec.dtype, torch.float32)) \
        if grad_loss is None else grad_loss
    grads = torch.ops.fastsae.matryoshka_grads(grad_x_hat, grad_loss, values, indices, W_dec, b_dec, x, x_hat,
                                               ctx.widths)
    (grad_values, grad_W, grad_b, grad_x), need = grads, ctx.needs_input_grad
    return (grad_values if need[0] else None, None, grad_W if need[2] else None, grad_b if need[3] else None,
            grad_x if need[4] else None, None)


_matryoshka_decode.register_autograd(_matryoshka_backward, setup_context=_matryoshka_setup)


# ---- the backend interface (what `fastsae.ops.backend_for` returns while compiling) -----------------


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return torch.ops.fastsae.encode_topk(x, W_enc, b_enc, k)


def encode_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.ops.fastsae.encode_threshold(x, W_enc, b_enc, None if threshold is None else threshold.detach())


def encode_jumprelu(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
    values, indices, window = torch.ops.fastsae.encode_jumprelu(x, W_enc, b_enc, threshold.detach(), bandwidth)
    return jumprelu.attach_threshold(values, indices, window, threshold, bandwidth), indices, window


def encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fastsae.encode_batchtopk(x, W_enc, b_enc, k)


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    return torch.ops.fastsae.decode(values, indices, W_dec, b_dec)


def matryoshka_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                      widths: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    return torch.ops.fastsae.matryoshka_decode(values, indices, W_dec, b_dec, x, list(widths))
