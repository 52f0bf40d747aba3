"""fp32 GEMMs on CPU through oneDNN, which PyTorch ships but leaves to bf16/fp16 on x86.

PyTorch sends a float32 `F.linear` on an x86 CPU to MKL's sgemm. oneDNN, built into the same wheel, has
its own fp32 GEMM (the matmul primitive behind `torch.ops.mkldnn._linear_pointwise`, which PyTorch's own
compiler emits for CPU linears). On this project's AMD EPYC (2 cores, AVX-512) MKL runs ~190 GFLOP/s and
oneDNN ~420, 2.1–2.8x faster at every shape fastsae runs: the CPU step's encoder (2048 × 768 × 16384)
123 against 274 ms, Gemma 3 270M's LM head at 1,024 tokens 0.82 against 2.26 s, a whole Gemma forward
1.73x (bench/results/training/cpu-gemm-2026-11-21.md). It is plain fp32 arithmetic (no bf16 or TF32 inside: errors
~3e-7 of Σ|x·W|, MKL's ~1e-7), reads the weight in place (no copy of it), and gives the same bits for 1 or
2 threads.

`linear(x, W, b)` takes that path wherever it applies (CPU, float32 everywhere, no gradient asked for,
oneDNN present and `torch.backends.mkldnn.enabled`, the switch PyTorch users already know) and is
F.linear elsewhere: the torch backend's encoders use it, and so do the nn.Linear layers of the models
`fastsae.model.load` gives. The op has no autograd formula, so anything that needs a gradient through
the product keeps F.linear.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def _op():
    """The oneDNN linear op, or None in a build without it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def applies(x: Tensor, W: Tensor, b: Tensor | None = None) -> bool:
    """Whether linear(x, W, b) takes oneDNN's GEMM."""
    if torch.compiler.is_compiling():  # Inductor picks oneDNN for a traced F.linear itself, and cannot lower this op
        return False
    tensors = (x, W) if b is None else (x, W, b)
    return (torch.backends.mkldnn.enabled and _op() is not None and x.dim() >= 2 and W.dim() == 2
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided
                    for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, W, b): x (..., d_in), W (d_out, d_in), b (d_out,) -> (..., d_out), by oneDNN where it applies."""
    if applies(x, W, b):
        return _op()(x, W, b, "none", [], "")
    return F.linear(x, W, b)
